"""EDNS(0) in one place: option codes, Extended DNS Error codes, reading and writing OPT.

Contract: ``find_option(options, code)`` walks an OPT record's RDATA (RFC 6891
§6.1.2: code, length, value, repeated) and returns the first value of ``code``,
tolerating a truncated tail; ``read_ede(options)`` reads an Extended DNS Error
(RFC 8914 §2); ``encode_opt(...)`` builds the OPT record we send. Every module
that names an option or an EDE info-code imports it from here.
"""

from __future__ import annotations

import struct

from horizon_dns.core.bounded import remember
from horizon_dns.core.wire import EDNS_DO, RR_FIXED, TYPE_OPT

# Option codes (IANA "DNS EDNS0 Option Codes").
OPTION_NSID = 3  # RFC 5001 §2.3
OPTION_EDE = 15  # RFC 8914 §2

# Extended DNS Error info-codes we send (RFC 8914 §4).
EDE_OTHER = 0  # §4.1
EDE_STALE_ANSWER = 3  # §4.4
EDE_PROHIBITED = 18  # §4.19
EDE_NOT_AUTHORITATIVE = 20  # §4.21
EDE_NOT_SUPPORTED = 21  # §4.22
EDE_NO_REACHABLE_AUTHORITY = 22  # §4.23

_OPTION_HEADER = struct.Struct("!HH")


def find_option(options: bytes, code: int) -> bytes | None:
    """The value of the first option ``code`` in an OPT's RDATA, or None when absent."""
    offset = 0
    size = len(options)
    while offset + 4 <= size:
        option, length = _OPTION_HEADER.unpack_from(options, offset)
        if option == code:
            return options[offset + 4 : offset + 4 + length]
        offset += 4 + length
    return None


def read_ede(options: bytes) -> tuple[int, str] | None:
    """The (info-code, extra text) of an Extended DNS Error option, or None (RFC 8914 §2)."""
    value = find_option(options, OPTION_EDE)
    if value is None or len(value) < 2:
        return None
    return int.from_bytes(value[:2], "big"), value[2:].decode("utf-8", "replace")


_OPTS: dict[tuple[int, int, bool, tuple[int, str] | None, bytes | None], bytes] = {}


def encode_opt(
    payload: int, rcode: int, do: bool, ede: tuple[int, str] | None, nsid: bytes | None = None
) -> bytes:
    """Our OPT record (RFC 6891 §6.1.2): root owner, payload in CLASS, flags in TTL.

    Options: NSID (RFC 5001) when given, Extended DNS Error (RFC 8914) when set.
    Remembered: a server sends the same few OPT records over and over.
    """
    key = (payload, rcode, do, ede, nsid)
    opt = _OPTS.get(key)
    if opt is None:
        # Bounded: EDE texts from upstreams may carry names.
        opt = remember(_OPTS, key, _build_opt(payload, rcode, do, ede, nsid), 1024)
    return opt


def _option(code: int, value: bytes) -> bytes:
    return _OPTION_HEADER.pack(code, len(value)) + value


def _build_opt(payload: int, rcode: int, do: bool, ede: tuple[int, str] | None, nsid: bytes | None) -> bytes:
    options = b""
    if nsid:
        options += _option(OPTION_NSID, nsid)
    if ede is not None:
        code, text = ede
        options += _option(OPTION_EDE, code.to_bytes(2, "big") + text.encode("utf-8"))
    # RFC 6891 §6.1.3: the upper 8 bits of a 12-bit rcode live in the OPT TTL.
    ttl = ((rcode >> 4) << 24) | (EDNS_DO if do else 0)
    return b"\x00" + RR_FIXED.pack(TYPE_OPT, payload, ttl, len(options)) + options
