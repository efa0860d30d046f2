"""Sans-IO pieces of the SMTP client: reply parsing, dot-stuffing, xtext.

No transport, no reactor: the client protocol feeds bytes in and writes what
comes out, so the byte rules are tested directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_LINE_END = re.compile(rb"\r\n|\r|\n")


class ProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


@dataclass(frozen=True)
class Reply:
    """One complete (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code at the start of the first line, if it matches the class."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        if match and match.group(1) == str(self.code)[0]:
            return match.group(0).strip()
        return None

    @property
    def text(self) -> str:
        """The reply text without the enhanced code, lines joined by spaces."""
        first = self.lines[0] if self.lines else ""
        if self.enhanced:
            first = first[len(self.enhanced):].lstrip()
        return " ".join([first, *self.lines[1:]]).strip()

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.lines)}".strip()


class ReplyParser:
    """Turns bytes from an SMTP server into :class:`Reply` objects."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code: bytes | None = None

    def feed(self, data: bytes) -> list[Reply]:
        """Add received bytes; return the replies completed by them."""
        self._buf += data
        replies = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    raise ProtocolError("reply line too long")
                return replies
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[: end + 1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        match = _REPLY_LINE.fullmatch(line)
        if match is None:
            raise ProtocolError(f"malformed reply line {line[:80]!r}")
        code, sep, text = match.groups()
        if self._code is not None and code != self._code:
            raise ProtocolError("reply code changed inside a multi-line reply")
        self._code = code
        self._lines.append(text.decode("utf-8", "replace"))
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError("too many reply lines")
        if sep == b"-":
            return None
        reply = Reply(int(code), tuple(self._lines))
        self._code, self._lines = None, []
        return reply


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """The extensions an EHLO reply offers: upper-case keyword to its parameters."""
    extensions = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload for *message*: CRLF line ends only, every line that starts
    with "." doubled (the first line too), then the terminating ``.CRLF``."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        message = _LINE_END.sub(b"\r\n", message)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def xtext_encode(text: str) -> str:
    """RFC 3461 xtext: "+", "=" and anything outside ! .. ~ as +XX."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext; ValueError if malformed."""
    data = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char == "+":
            hexa = text[index + 1: index + 3]
            if len(hexa) != 2 or not all(c in "0123456789ABCDEF" for c in hexa):
                raise ValueError(f"bad xtext escape in {text!r}")
            data.append(int(hexa, 16))
            index += 3
            continue
        if not 33 <= ord(char) <= 126 or char == "=":
            raise ValueError(f"bad xtext character in {text!r}")
        data.append(ord(char))
        index += 1
    return data.decode("utf-8", "replace")
