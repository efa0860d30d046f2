"""Mailbox names on the wire: modified UTF-7 (RFC 3501 5.1.3), validation, LIST patterns.

Sans-IO. Decoding is strict: only the canonical encoding is accepted, so a
name can never smuggle ``/``, ``.``, NUL or any other printable ASCII
character inside a ``&...-`` shift (``&AC4ALg-`` for ``..``), lone UTF-16
surrogates are refused, and 8-bit octets are refused (no UTF8=ACCEPT). After
decoding, the storage layer's :func:`validate_folder_name` rejects ``..``,
empty components, control characters and ``*``/``%``. Twisted's
``imap4-utf-7`` codec accepts all of these tricks, which is why it is not
used.
"""

from __future__ import annotations

import re

from mailtwist import mutf7
from mailtwist.storage.maildir import InvalidFolderName, validate_folder_name

DELIMITER = "/"


class InvalidName(ValueError):
    """A mailbox name we refuse (answer NO); the message is safe to send."""


def encode_mutf7(text: str) -> bytes:
    """Encode a mailbox name (``/`` separators) in modified UTF-7."""
    return mutf7.encode(text).encode("ascii")


def decode_mutf7(raw: bytes) -> str:
    """Decode a mailbox name from the wire, accepting only the canonical encoding."""
    try:
        return mutf7.decode(raw.decode("ascii"))
    except UnicodeDecodeError:
        raise InvalidName("mailbox names must be 7-bit modified UTF-7") from None
    except ValueError as e:
        raise InvalidName(f"invalid modified UTF-7 in mailbox name: {e}") from None


def mailbox_name(raw: bytes) -> str:
    """The canonical folder name for a mailbox argument from the wire.

    INBOX in any case becomes ``INBOX``; a trailing delimiter is dropped
    (RFC 3501 CREATE allows it).
    """
    text = decode_mutf7(raw)
    if text.endswith(DELIMITER) and len(text) > 1:
        text = text[:-1]
    try:
        return validate_folder_name(text)
    except InvalidFolderName as e:
        raise InvalidName(_printable(str(e))) from None


def _printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:200]


def wire_name(name: str) -> bytes:
    """A folder name as an IMAP quoted string (names are ASCII once encoded)."""
    encoded = encode_mutf7(name)
    return b'"' + encoded.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def list_pattern(reference: bytes, pattern: bytes) -> re.Pattern[str] | None:
    """A matcher for LIST's reference and mailbox pattern, on decoded names.

    The two are simply concatenated, as Dovecot does. ``*`` matches
    anything, ``%`` anything but the delimiter, and a leading ``INBOX``
    matches case-insensitively. Returns None if the
    pattern cannot match any valid name (e.g. invalid modified UTF-7).
    """
    combined = reference + pattern
    inbox = combined[:5].upper() == b"INBOX"
    if inbox:
        combined = combined[5:]
    regex = ["(?i:INBOX)"] if inbox else []
    for piece in re.split(rb"([*%])", combined):
        if piece == b"*":
            regex.append(".*")
        elif piece == b"%":
            regex.append("[^/]*")
        elif piece:
            try:
                regex.append(re.escape(decode_mutf7(piece)))
            except InvalidName:
                return None
    text = "".join(regex)
    return re.compile(text, re.DOTALL)

