"""mailtwist: one small mail server (SMTP, POP3, IMAP over Maildir) on Twisted."""
