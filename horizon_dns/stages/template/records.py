"""Rendered text to records: the zone-file parser the template stage trusts, and name helpers.

Contract: ``parse_zone_lines(text, ttl)`` turns rendered zone-file text into dnslib
records or raises :class:`BadRecord` with a reason a user can act on (too long, not
a record, not encodable); ``in_zone``, ``zone_name`` and ``labels`` are the name
checks the stage and its builder share.
"""

from __future__ import annotations

import re

from dnslib import RR, DNSBuffer

MAX_RENDERED = 16384  # characters of rendered text a template may produce


class BadRecord(Exception):
    pass


STAND_IN = "horizon-dns-owner.invalid."  # RFC 6761 §6.4: .invalid is never a real name


def labels(wire: bytes) -> list[bytes]:
    out: list[bytes] = []
    offset = 0
    while wire[offset]:
        out.append(wire[offset + 1 : offset + 1 + wire[offset]])
        offset += 1 + wire[offset]
    return out


def parse_zone_lines(text: str, ttl: int) -> list[RR]:
    """Parse rendered zone-file text; raise BadRecord with a readable reason."""
    if len(text) > MAX_RENDERED:
        raise BadRecord(f"rendered text is {len(text)} characters, over {MAX_RENDERED}")
    if not text.strip():
        return []
    try:
        records = list(RR.fromZone(text, ttl=ttl))
    except Exception as exc:  # dnslib raises many types on bad text
        raise BadRecord(f"{text.strip()!r} is not a valid record: {exc or type(exc).__name__}") from None
    if not records:
        raise BadRecord(f"{text.strip()!r} is not a valid record")
    for rr in records:
        try:
            rr.pack(DNSBuffer())
        except Exception as exc:
            raise BadRecord(f"{text.strip()!r} cannot be encoded: {exc}") from None
    return records


def in_zone(name: str, zone: str) -> bool:
    return zone == "." or name == zone or name.endswith("." + zone)


# Every escape but \DDD (RFC 1035 §5.1), rewritten as \DDD for the regexes.
DIGIT_ESCAPE_NEEDED = re.compile(r"\\([^0-9])")


def digit_escape(escape: re.Match[str]) -> str:
    return f"\\{ord(escape.group(1)):03d}"


def zone_name(text: str) -> str:
    text = text.lower()
    return text if text.endswith(".") else text + "."
