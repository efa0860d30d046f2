"""The filter plugin API: hook interfaces, verdicts and the session context.

A filter is an object providing :class:`IFilter`.  It has one method per
stage of an SMTP session; each takes the :class:`FilterSession` first and
returns a verdict (or a Deferred firing with one):

==============  ==========================================  =======================
stage           method                                      verdicts allowed
==============  ==========================================  =======================
``connect``     ``connect(session)``                        Continue, Accept, Reject, TempFail
``helo``        ``helo(session, name)``                     Continue, Accept, Reject, TempFail
``auth``        ``auth(session, username, success)``        Continue, Accept, Reject, TempFail
``mail``        ``mail_from(session, sender)``              all but message actions
``rcpt``        ``rcpt_to(session, recipient)``             all but message actions
``data``        ``data(session, message)``                  all; actions: headers, FileInto,
                                                            AddFlags, Redirect
``delivery``    ``delivery(session, message, target)``      all; actions: FileInto, AddFlags,
                                                            Redirect
==============  ==========================================  =======================

Subclass :class:`mailtwist.filters.Filter` to get a "Continue" default for
every stage and override only the stages you need.  A filter is built by an
:class:`IFilterFactory` (found as a twisted.plugin in ``mailtwist.plugins`` or
named by dotted path in ``mailtwist.toml``), which validates its settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from zope.interface import Attribute, Interface

STAGES = ("connect", "helo", "auth", "mail", "rcpt", "data", "delivery", "outbound",
          "mailbox")

#: Stages whose first argument after the session is the message (editable headers).
MESSAGE_STAGES = ("data", "delivery", "outbound")

#: The IFilter method called at each stage.
STAGE_METHODS = {
    "connect": "connect",
    "helo": "helo",
    "auth": "auth",
    "mail": "mail_from",
    "rcpt": "rcpt_to",
    "data": "data",
    "delivery": "delivery",
    "outbound": "outbound",
    "mailbox": "mailbox_event",
}


# -- message actions ----------------------------------------------------------

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")


def _check_header(name: str, value: str | None = None) -> None:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"invalid header name {name!r}")
    if value is not None and ("\r" in value or "\n" in value or "\0" in value):
        raise ValueError(f"header {name}: value must not contain CR, LF or NUL")


@dataclass(frozen=True)
class AddHeader:
    """Add ``name: value`` at the top of the header section (data stage)."""

    name: str
    value: str

    def __post_init__(self) -> None:
        _check_header(self.name, self.value)


@dataclass(frozen=True)
class ChangeHeader:
    """Replace every ``name`` header by one ``name: value`` (added if absent; data stage)."""

    name: str
    value: str

    def __post_init__(self) -> None:
        _check_header(self.name, self.value)


@dataclass(frozen=True)
class RemoveHeader:
    """Remove every ``name`` header (data stage)."""

    name: str

    def __post_init__(self) -> None:
        _check_header(self.name)


@dataclass(frozen=True)
class FileInto:
    """Store local copies in this folder ("Junk", "Lists/python"); created when missing."""

    folder: str

    def __post_init__(self) -> None:
        from mailtwist.storage.maildir import validate_folder_name

        validate_folder_name(self.folder)


_SYSTEM_FLAGS = {"\\seen": "S", "\\flagged": "F", "\\answered": "R", "\\draft": "D",
                 "\\deleted": "T"}


@dataclass(frozen=True)
class AddFlags:
    r"""Store local copies with these IMAP system flags (``\Seen``, ``\Flagged``, ...)."""

    flags: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.flags, str):
            object.__setattr__(self, "flags", (self.flags,))
        for flag in self.flags:
            if flag.lower() not in _SYSTEM_FLAGS:
                raise ValueError(f"unsupported flag {flag!r}; allowed: "
                                 "\\Seen, \\Flagged, \\Answered, \\Draft, \\Deleted")

    @property
    def letters(self) -> str:
        """The Maildir info letters of these flags."""
        return "".join(sorted({_SYSTEM_FLAGS[f.lower()] for f in self.flags}))


@dataclass(frozen=True)
class Redirect:
    """Deliver to these addresses instead (all recipients at the data stage, this
    one at the delivery stage); the envelope sender is kept."""

    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.addresses, str):
            object.__setattr__(self, "addresses", (self.addresses,))
        if not self.addresses:
            raise ValueError("Redirect needs at least one address")
        for address in self.addresses:
            if "@" not in address or any(c in address for c in "\r\n\0<> "):
                raise ValueError(f"Redirect: invalid address {address!r}")


HeaderAction = Union[AddHeader, ChangeHeader, RemoveHeader]
Action = Union[AddHeader, ChangeHeader, RemoveHeader, FileInto, AddFlags, Redirect]
HEADER_ACTIONS = (AddHeader, ChangeHeader, RemoveHeader)
DELIVERY_ACTIONS = (FileInto, AddFlags, Redirect)


# -- verdicts -----------------------------------------------------------------

@dataclass(frozen=True)
class Continue:
    """Go on with the next filter; *actions* apply (data and delivery stages only)."""

    actions: tuple[Action, ...] = ()

    def __init__(self, *actions: Action) -> None:
        object.__setattr__(self, "actions", tuple(actions))


@dataclass(frozen=True)
class Accept:
    """Like Continue, but the later filters of this stage are not asked."""

    actions: tuple[Action, ...] = ()

    def __init__(self, *actions: Action) -> None:
        object.__setattr__(self, "actions", tuple(actions))


@dataclass(frozen=True)
class Reject:
    """Refuse with a permanent 5xx reply (at data/delivery: the whole message)."""

    text: str = "Rejected by policy"
    code: int = 550
    enhanced: str = "5.7.1"

    def __post_init__(self) -> None:
        _check_reply(self, 500, "5.")


@dataclass(frozen=True)
class TempFail:
    """Refuse with a temporary 4xx reply; the client retries later."""

    text: str = "Try again later"
    code: int = 451
    enhanced: str = "4.7.1"

    def __post_init__(self) -> None:
        _check_reply(self, 400, "4.")


@dataclass(frozen=True)
class Discard:
    """Answer as if accepted but store nothing (mail, rcpt: that recipient; data:
    the message; delivery: this local copy)."""


@dataclass(frozen=True)
class Quarantine:
    """Keep the message out of the mailboxes (data stage: the whole message;
    delivery stage: this local copy): it is stored durably under
    ``data_dir/quarantine/`` with its envelope and *reason*, the client gets
    250, and ``mailtwist quarantine release ID`` delivers it later."""

    reason: str = "quarantined by a filter"

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or any(c in self.reason for c in "\r\n\0"):
            raise ValueError("Quarantine: reason must be a string without CR, LF or NUL")


def _check_reply(verdict: Reject | TempFail, base: int, prefix: str) -> None:
    if not (isinstance(verdict.code, int) and base <= verdict.code < base + 100):
        raise ValueError(f"{type(verdict).__name__}: code must be {base // 100}xx, "
                         f"got {verdict.code!r}")
    if not re.match(r"^\d\.\d{1,3}\.\d{1,3}$", verdict.enhanced or "") \
            or not verdict.enhanced.startswith(prefix):
        raise ValueError(f"{type(verdict).__name__}: enhanced code must look like "
                         f"{prefix}7.1, got {verdict.enhanced!r}")
    if any(c in verdict.text for c in "\r\n\0"):
        raise ValueError("reply text must not contain CR, LF or NUL")


Verdict = Union[Continue, Accept, Reject, TempFail, Discard, Quarantine]
VERDICTS = (Continue, Accept, Reject, TempFail, Discard, Quarantine)
CONTINUE = Continue()


# -- what a filter sees ---------------------------------------------------------

@dataclass
class FilterSession:
    """One SMTP session as the filters see it.  Filters may keep their own
    state in :meth:`state_for`; everything else is read-only for them."""

    role: str
    peer_host: str
    peer_port: int | None = None
    tls: bool = False
    helo: str | None = None
    user: str | None = None
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    queue_id: str | None = None
    _state: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def state_for(self, name: str) -> dict[str, Any]:
        """A dict private to filter *name* that lives as long as the session."""
        return self._state.setdefault(name, {})

    def reset_envelope(self) -> None:
        """Forget the sender and recipients (RSET, new MAIL, STARTTLS, end of DATA)."""
        self.sender = None
        self.recipients = []
        self.queue_id = None


@dataclass(frozen=True)
class FilterContext:
    """What the server tells a filter about itself when building it: its host
    name (the authserv-id of Authentication-Results, the greeting name), a
    private directory for persistent state (``data_dir/filters/<name>``,
    created on first use by the filter), the DNS servers of ``[outbound]``
    (``host:port`` strings; empty means the system resolver), the reactor, a
    thread pool for blocking work and the number of worker processes."""

    hostname: str
    state_dir: Any
    dns_servers: tuple[str, ...] = ()
    dns_timeout: float = 10.0
    reactor: Any = None
    threadpool: Any = None
    #: Server processes sharing the listeners (``workers``): above 1, state a
    #: filter keeps in memory is per process, so shared state belongs in state_dir.
    workers: int = 1


@dataclass(frozen=True)
class DeliveryTarget:
    """One local copy at the delivery stage: the account it is stored for and
    the envelope address the mail was sent to."""

    account: str
    address: str


@dataclass(frozen=True)
class MailboxEvent:
    """Messages were copied, moved or appended between an account's folders by
    IMAP (e.g. moved into Junk: a spam filter can learn from them).

    *kind* is ``"copy"``, ``"move"`` or ``"append"``; *source* is None for
    append.  *uids* are the messages' UIDs in *destination* (for copy and move
    in the same order as *source_uids*).  :meth:`read_messages` reads them in
    a thread (never on the reactor)."""

    user: str
    kind: str
    source: str | None
    destination: str
    source_uids: tuple[int, ...] = ()
    uids: tuple[int, ...] = ()
    reader: Any = field(default=None, repr=False, compare=False)

    def read_messages(self) -> Any:
        """A Deferred firing with ``[(uid, message bytes), ...]`` of the copies in
        *destination* (CRLF line ends; messages expunged meanwhile are left out)."""
        from twisted.internet import defer

        if self.reader is None:
            return defer.succeed([])
        return defer.maybeDeferred(self.reader, self.uids)


# -- interfaces -----------------------------------------------------------------

class IFilter(Interface):
    """A filter: one method per stage; each returns a verdict or a Deferred of one."""

    name = Attribute("Short name used in logs and replies, e.g. 'junk_header'.")

    def connect(session: FilterSession) -> Any:
        """A client connected (``session.peer_host``, ``session.tls``)."""

    def helo(session: FilterSession, name: str) -> Any:
        """HELO/EHLO *name* (already stripped of control characters)."""

    def auth(session: FilterSession, username: str, success: bool) -> Any:
        """An AUTH attempt for *username* ended; Reject/TempFail replace the reply
        (after a success, the client stays unauthenticated)."""

    def mail_from(session: FilterSession, sender: str) -> Any:
        """MAIL FROM:<sender> passed the listener's policy ("" is the null sender)."""

    def rcpt_to(session: FilterSession, recipient: str) -> Any:
        """RCPT TO:<recipient> passed the listener's policy."""

    def data(session: FilterSession, message: bytes) -> Any:
        """The whole message (CRLF, our Received header first) before it is stored."""

    def delivery(session: FilterSession, message: bytes, target: DeliveryTarget) -> Any:
        """One local copy of *message* is about to be written for *target*."""

    def outbound(session: FilterSession, message: bytes, recipients: list[str]) -> Any:
        """*message* is about to be spooled for the remote *recipients*; header
        actions edit only that outbound copy (before DKIM signing).  Filters
        written before this stage existed may lack the method (Continue)."""

    def mailbox_event(event: MailboxEvent) -> Any:
        """IMAP copied or moved messages (:class:`MailboxEvent`); a notification,
        the verdict is ignored.  May be missing on older filters."""


class IFilterFactory(Interface):
    """Builds a filter from its settings; what ``mailtwist.plugins`` modules export."""

    name = Attribute("The name mailtwist.toml enables the filter by.")
    description = Attribute("One line for `mailtwist filters`.")

    def build(settings: Mapping[str, Any], context: FilterContext | None = None) -> IFilter:
        """A filter for these settings (the ``[filters.NAME]`` table, maybe empty);
        raise :class:`mailtwist.filters.FilterConfigError` for a bad one.
        *context* is the server's :class:`FilterContext` (None in unit tests that
        build a filter alone); factories written before it existed may omit the
        parameter, the loader then calls ``build(settings)``."""
