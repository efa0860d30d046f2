"""Reading and editing the header section of a CRLF message (bytes)."""

from __future__ import annotations

from typing import Iterable

from mailtwist.interfaces import AddHeader, ChangeHeader, HeaderAction, RemoveHeader


def _split(message: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its folded lines and CRLF) and the rest
    (the blank line and the body)."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(message):
        end = message.find(b"\n", pos)
        line_end = len(message) if end < 0 else end + 1
        line = message[pos:line_end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif b":" in line:
            fields.append(line)
        else:
            break
        pos = line_end
    return fields, message[pos:]


def _field_name(raw: bytes) -> str:
    return raw.partition(b":")[0].strip().decode("ascii", "replace").lower()


def header_values(message: bytes, name: str) -> list[str]:
    """The unfolded values of every *name* header, in order (case-insensitive)."""
    fields, _ = _split(message)
    wanted = name.lower()
    values = []
    for raw in fields:
        if _field_name(raw) == wanted:
            value = raw.partition(b":")[2]
            value = value.replace(b"\r\n", b"").replace(b"\n", b"").strip()
            values.append(value.decode("utf-8", "replace"))
    return values


def _encode(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8")


def apply_header_actions(message: bytes, actions: Iterable[HeaderAction]) -> bytes:
    """*message* with the header edits applied in order."""
    fields, rest = _split(message)
    for action in actions:
        if isinstance(action, AddHeader):
            fields.insert(0, _encode(action.name, action.value))
        elif isinstance(action, RemoveHeader):
            fields = [f for f in fields if _field_name(f) != action.name.lower()]
        elif isinstance(action, ChangeHeader):
            wanted = action.name.lower()
            index = next((i for i, f in enumerate(fields) if _field_name(f) == wanted), None)
            new = _encode(action.name, action.value)
            fields = [f for f in fields if _field_name(f) != wanted]
            fields.insert(len(fields) if index is None else index, new)
        else:
            raise TypeError(f"not a header action: {action!r}")
    if not rest:
        rest = b"\r\n"
    return b"".join(fields) + rest
