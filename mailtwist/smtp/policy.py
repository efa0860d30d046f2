"""Who may send what where: the rules of each SMTP listener role.

- ``smtp`` (port 25, the world): mail for our domains only; no AUTH.
- ``submission``/``submissions`` (587/465, our users): AUTH first (only under
  TLS unless configured otherwise), then MAIL FROM one of the user's own
  addresses and any recipient; other domains go to the outbound queue.

Aliases may forward to other domains on every port: the remote targets are
queued too.  Unauthenticated mail for other domains is never relayed.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP as IMessage
from twisted.mail.smtp import SMTPBadRcpt, SMTPBadSender
from zope.interface import implementer

from mailtwist.delivery import Mailbox
from mailtwist.directory import FileDirectory
from mailtwist.queue.envelope import Recipient
from mailtwist.smtp.wire import split_address


class PolicyReject(Exception):
    """An SMTP reply refusing a sender or recipient."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text


@dataclass(frozen=True)
class Route:
    """Where mail for one recipient goes: local accounts and remote addresses."""

    local: tuple[str, ...]
    remote: tuple[str, ...]


class SMTPPolicy:
    """The rules for one listener role."""

    def __init__(self, role: str, directory: FileDirectory) -> None:
        self.role = role
        self.directory = directory
        self.offers_auth = role in ("submission", "submissions")
        self.requires_auth = self.offers_auth
        self.offers_dsn = self.offers_auth

    def check_sender(self, sender: str, user: str | None) -> None:
        """Raise PolicyReject unless *user* (None: unauthenticated) may use *sender*."""
        if self.requires_auth and user is None:
            raise PolicyReject(530, "5.7.0", "Error: authentication required")
        if user is not None and sender and not self.owns(user, sender):
            raise PolicyReject(553, "5.7.1",
                               f"<{sender}>: Sender address rejected: not owned by user {user}")

    def owns(self, user: str, address: str) -> bool:
        """True if mail to *address* reaches *user* and nobody else (own address,
        plus-address, or an alias of theirs)."""
        try:
            local, domain = split_address(address)
        except ValueError:
            return False
        if not self.directory.is_local_domain(domain):
            return False
        resolution = self.directory.resolve(f"{local}@{domain}")
        return (resolution is not None and resolution.local == (user,)
                and not resolution.remote)

    def route_recipient(self, recipient: str, user: str | None) -> Route:
        """Where mail for *recipient* goes, or PolicyReject."""
        if "@" in recipient:
            try:
                local, domain = split_address(recipient)
            except ValueError:
                raise PolicyReject(501, "5.1.3", f"<{recipient}>: bad recipient address syntax")
        elif recipient.lower() == "postmaster":
            local, domain = "postmaster", ""
        else:
            raise PolicyReject(501, "5.1.3", f"<{recipient}>: bad recipient address syntax")
        if domain and not self.directory.is_local_domain(domain):
            if user is None:
                raise PolicyReject(554, "5.7.1", f"<{recipient}>: Relay access denied")
            if domain.startswith("["):
                raise PolicyReject(550, "5.1.2", f"<{recipient}>: address literals are not "
                                                 "accepted for delivery to other hosts")
            return Route((), (recipient,))
        resolution = self.directory.resolve(f"{local}@{domain}" if domain else local)
        if resolution is None or not (resolution.local or resolution.remote):
            raise PolicyReject(550, "5.1.1",
                               f"<{recipient}>: Recipient address rejected: User unknown")
        return Route(resolution.local, resolution.remote)


@implementer(IMessage)
class _BufferedMessage:
    """Twisted's line-by-line IMessage, delivered as a whole at end of data."""

    def __init__(self, delivery, sender: str, mailboxes: list[Mailbox],
                 remote: list[Recipient]) -> None:
        self.delivery = delivery
        self.sender = sender
        self.mailboxes = mailboxes
        self.remote = remote
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self):
        message = b"\r\n".join(self.lines) + b"\r\n"
        return self.delivery.deliver(message, self.sender, self.mailboxes, self.remote,
                                     sign=True)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(IMessageDelivery)
class AuthenticatedSender:
    """The SMTP avatar of an authenticated account.

    Our protocol reads ``address`` and applies the policy itself; the
    IMessageDelivery methods give the same rules to any Twisted SMTP server
    that is handed this avatar.
    """

    def __init__(self, address: str, policy: SMTPPolicy, delivery) -> None:
        self.address = address
        self.policy = policy
        self.delivery = delivery

    def receivedHeader(self, helo, origin, recipients) -> None:
        return None

    def validateFrom(self, helo, origin):
        try:
            self.policy.check_sender(str(origin), self.address)
        except PolicyReject as e:
            raise SMTPBadSender(origin, e.code, e.text) from None
        return origin

    def validateTo(self, user):
        try:
            route = self.policy.route_recipient(str(user.dest), self.address)
        except PolicyReject as e:
            raise SMTPBadRcpt(user, e.code, e.text) from None
        mailboxes = [Mailbox(a, str(user.dest)) for a in route.local]
        remote = [Recipient(a) for a in route.remote]
        return lambda: _BufferedMessage(self.delivery, str(user.orig), mailboxes, remote)


def register_smtp(realm, directory: FileDirectory, delivery) -> None:
    """Let the realm hand out SMTP avatars for authenticated accounts."""
    policy = SMTPPolicy("submission", directory)
    realm.register(IMessageDelivery,
                   lambda address: AuthenticatedSender(address, policy, delivery))
