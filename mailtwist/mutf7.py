"""IMAP modified UTF-7 (RFC 3501 5.1.3), strict: one canonical encoding per name.

Used for mailbox names on the wire and for Maildir++ folder directory names.
Decoding accepts only what :func:`encode` would produce, so a name can never
smuggle ``/``, ``.``, NUL or any other printable ASCII inside a ``&...-``
shift (``&AC4ALg-`` for ``..``), lone UTF-16 surrogates are refused, and two
different encodings never decode to the same name. Twisted's ``imap4-utf-7``
codec accepts all of these tricks, which is why it is not used.
"""

from __future__ import annotations

import base64
import binascii


def encode(text: str) -> str:
    """Encode *text* in modified UTF-7."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be", "surrogatepass")
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
    return "".join(out)


def decode(text: str) -> str:
    """Decode modified UTF-7; ValueError unless *text* is canonically encoded."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "&":
            end = text.find("-", i + 1)
            if end < 0:
                raise ValueError("unterminated '&' shift")
            chunk = text[i + 1:end]
            if not chunk:
                out.append("&")
            else:
                b64 = chunk.replace(",", "/")
                b64 += "=" * (-len(b64) % 4)
                try:
                    raw = base64.b64decode(b64, validate=True)
                except binascii.Error:
                    raise ValueError("bad base64 in a '&' shift") from None
                if len(raw) % 2:
                    raise ValueError("odd number of UTF-16 bytes in a '&' shift")
                out.append(raw.decode("utf-16-be"))
            i = end + 1
        elif " " <= ch <= "~":
            out.append(ch)
            i += 1
        else:
            raise ValueError("not 7-bit printable ASCII")
    decoded = "".join(out)
    if encode(decoded) != text:
        raise ValueError("not the canonical encoding")
    return decoded
