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

import base64
import binascii
import re

from mailtwist.storage.maildir import InvalidFolderName, validate_folder_name

DELIMITER = "/"


class InvalidName(ValueError):
    """A mailbox name we refuse (answer NO); the message is safe to send."""


def encode_mutf7(text: str) -> bytes:
    """Encode a mailbox name (``/`` separators) in modified UTF-7."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=")
            out.append("&" + b64.replace("/", ",") + "-")
            pending.clear()

    for ch in text:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out).encode("ascii")


_SHIFT_ALPHABET = re.compile(rb"[A-Za-z0-9+,]*")


def decode_mutf7(raw: bytes) -> str:
    """Decode modified UTF-7, accepting only the canonical encoding."""
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x26:
            end = raw.find(b"-", i + 1)
            if end < 0:
                raise InvalidName("unterminated '&' in mailbox name")
            chunk = raw[i + 1:end]
            if not chunk:
                out.append("&")
            else:
                if not _SHIFT_ALPHABET.fullmatch(chunk):
                    raise InvalidName("invalid modified UTF-7 in mailbox name")
                b64 = chunk.replace(b",", b"/")
                b64 += b"=" * (-len(b64) % 4)
                try:
                    data = base64.b64decode(b64, validate=True)
                    if len(data) % 2:
                        raise ValueError("odd length")
                    text = data.decode("utf-16-be")
                except (binascii.Error, ValueError):
                    raise InvalidName("invalid modified UTF-7 in mailbox name") from None
                if any(" " <= ch <= "~" for ch in text):
                    raise InvalidName("printable ASCII encoded in modified UTF-7")
                out.append(text)
            i = end + 1
        elif 0x20 <= c <= 0x7E:
            out.append(chr(c))
            i += 1
        else:
            raise InvalidName("mailbox names must be 7-bit modified UTF-7")
    decoded = "".join(out)
    if encode_mutf7(decoded) != raw:
        raise InvalidName("non-canonical modified UTF-7 in mailbox name")
    return decoded


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

