"""Domain names between wire form and presentation form (RFC 1035 §3.1, §5.1)."""

from __future__ import annotations

import re

MAX_NAME_WIRE = 255  # RFC 1035 §3.1
MAX_LABEL = 63  # RFC 1035 §2.3.4
_SPECIAL = b'.\\"();@$'
# Labels that need no escaping: the overwhelming majority, converted without a loop.
_PLAIN = re.compile(rb"[A-Za-z0-9_\-*/+=:#%&!?,<>\[\]^`{|}~']+")
_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_\-*/+=:#%&!?,<>\[\]^`{|}~'.]+")


def name_to_text(wire: bytes) -> str:
    """Presentation form of a wire name, with trailing dot (RFC 1035 §5.1 escapes)."""
    if wire == b"\x00":
        return "."
    labels: list[bytes] = []
    offset = 0
    while length := wire[offset]:
        labels.append(wire[offset + 1 : offset + 1 + length])
        offset += 1 + length
    joined = b".".join(labels)
    # The common case in one test: no label needs an escape (and none holds a dot).
    if _PLAIN_NAME.fullmatch(joined) and joined.count(b".") == len(labels) - 1:
        return joined.decode("ascii") + "."
    parts: list[str] = []
    for label in labels:
        if _PLAIN.fullmatch(label) or all(0x21 <= b <= 0x7E and b not in _SPECIAL for b in label):
            parts.append(label.decode("ascii"))
        else:
            parts.append("".join(_escape_byte(b) for b in label))
    return ".".join(parts) + "."


def _escape_byte(b: int) -> str:
    if b in _SPECIAL:
        return "\\" + chr(b)
    if 0x21 <= b <= 0x7E:
        return chr(b)
    return f"\\{b:03d}"


def text_to_name(text: str) -> bytes:
    """Wire form of a presentation name (absolute; a missing final dot is implied)."""
    if text in (".", ""):
        return b"\x00"
    labels: list[bytes] = []
    current = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            digits = text[i + 1 : i + 4]
            if len(digits) == 3 and digits.isdigit():
                current.append(int(digits))
                i += 4
                continue
            if i + 1 >= len(text):
                raise ValueError(f"name {text!r} ends with a lone backslash")
            current.extend(text[i + 1].encode("latin-1", "replace"))
            i += 2
            continue
        if ch == ".":
            labels.append(bytes(current))
            current = bytearray()
        else:
            current.extend(ch.encode("utf-8"))
        i += 1
    if current:
        labels.append(bytes(current))
    out = bytearray()
    for label in labels:
        if not label or len(label) > MAX_LABEL:
            raise ValueError(f"bad label in name {text!r}")
        out.append(len(label))
        out.extend(label)
    out.append(0)
    if len(out) > MAX_NAME_WIRE:
        raise ValueError(f"name {text!r} longer than 255 bytes")
    return bytes(out)
