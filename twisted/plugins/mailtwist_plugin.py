"""twistd plugin: ``twistd mailtwist``. Kept import-cheap; the work is in mailtwist.tap."""

from twisted.application.service import ServiceMaker

mailtwist = ServiceMaker(
    "mailtwist",
    "mailtwist.tap",
    "A small mail server: SMTP, submission, POP3 (and IMAP) over Maildir",
    "mailtwist",
)
