"""DNS wire format at the edge: decode a query, encode headers, OPT and error replies.

Contract: ``decode_query(data)`` turns the bytes of one DNS message into a
:class:`~horizon_dns.core.message.Query` without building any dnslib object, or
raises one of three exceptions that tell the edge what to do:

* :class:`Drop` -- not worth an answer (shorter than a header, QR=1: RFC 5452 §9
  and reflection defence);
* :class:`NotImplementedOpcode` -- opcode other than QUERY: answer NOTIMP (RFC 1035 §4.1.1);
* :class:`FormatError` -- the header decodes but the rest does not: answer FORMERR
  with the same ID (RFC 1035 §4.1.1, RFC 6891 §6.1.1 for a second OPT).

Everything here is pure and cheap: ``struct`` over ``bytes``.
"""

from __future__ import annotations

import struct

from horizon_dns.core.message import Edns, Query
from horizon_dns.core.names import MAX_LABEL, MAX_NAME_WIRE
from horizon_dns.errors import Error

HEADER = struct.Struct("!HHHHHH")
_QTAIL = struct.Struct("!HH")
RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, rdlength
TCP_LENGTH = struct.Struct("!H")  # RFC 1035 §4.2.2: each message over TCP behind its length

# Flag bits of the second header word (RFC 1035 §4.1.1, RFC 4035 §3.2).
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010
OPCODE_MASK = 0x7800

# Response codes (RFC 1035 §4.1.1, RFC 6891 §9).
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
#: Mnemonics of the rcodes we send or read (RFC 1035 §4.1.1, RFC 6891 §9); the one table.
RCODE_NAMES = {
    NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL", NXDOMAIN: "NXDOMAIN",
    NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS",
}  # fmt: skip


def rcode_name(rcode: int) -> str:
    """``NXDOMAIN`` for 3; the number as text for an rcode without a name here."""
    return RCODE_NAMES.get(rcode) or str(rcode)


TYPE_OPT = 41
CLASS_IN = 1
# RFC 6891 §6.1.4: DO is the top bit of the 16 flag bits inside the OPT TTL.
EDNS_DO = 0x8000


class Drop(Error):
    """The message gets no reply at all."""


class NotImplementedOpcode(Error):
    """The opcode is not QUERY; the edge answers NOTIMP (with OPT if the message had one)."""

    def __init__(self, msg_id: int, flags: int, edns: Edns | None = None) -> None:
        super().__init__(f"opcode {(flags & OPCODE_MASK) >> 11} not implemented")
        self.msg_id = msg_id
        self.flags = flags
        self.edns = edns


class FormatError(Error):
    """The header decoded, the rest did not; the edge answers FORMERR (with OPT if readable)."""

    def __init__(self, msg_id: int, flags: int, why: str, edns: Edns | None = None) -> None:
        super().__init__(why)
        self.msg_id = msg_id
        self.flags = flags
        self.edns = edns


def read_name(data: bytes, offset: int) -> tuple[bytes, int]:
    """Read an uncompressed name at ``offset``; return its wire bytes and the next offset.

    A question is the first name of a message, so it has nothing earlier to point
    to: a compression pointer there is a format error, as are labels over 63
    bytes (RFC 1035 §2.3.4) and names over 255 bytes.
    """
    start = offset
    end = len(data)
    while True:
        if offset >= end:
            raise ValueError("name runs past the end of the message")
        length = data[offset]
        if length == 0:
            offset += 1
            break
        if length > MAX_LABEL:
            raise ValueError("compression pointer or bad label length in question name")
        offset += 1 + length
    if offset - start > MAX_NAME_WIRE:
        raise ValueError("name longer than 255 bytes")
    if offset > end:
        raise ValueError("name runs past the end of the message")
    return data[start:offset], offset


def skip_name(data: bytes, offset: int) -> int:
    """Skip a possibly compressed name in a record section; return the next offset."""
    end = len(data)
    while True:
        if offset >= end:
            raise ValueError("name runs past the end of the message")
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            if offset + 2 > end:
                raise ValueError("truncated compression pointer")
            return offset + 2
        if length > MAX_LABEL:
            raise ValueError("bad label type")
        offset += 1 + length


#: The cache key's last byte: DO (2) and CD (1), which change what a reply holds.
_KEY_BITS = (b"\x00", b"\x01", b"\x02", b"\x03")


def cache_key(lower_name: bytes, type_class: bytes, do: bool, cd: bool) -> bytes:
    """The key of a question in every cache: its lowercased wire name (RFC 4343), its
    type and class as sent, and the DO and CD bits. The one definition the hot path
    and the full path share."""
    return lower_name + type_class + _KEY_BITS[(2 if do else 0) | (1 if cd else 0)]


#: What :func:`scan_common` reads from a query of the common shape: (ID, flags,
#: offset of the root label ending the question name, OPT payload or -1 without
#: OPT, DO bit, OPT options). The question ends 5 bytes after the root label.
Common = tuple[int, int, int, int, bool, bytes]


def scan_common(data: bytes) -> Common | None:
    """Read a query of the common shape, or None for any other message.

    The common shape: QR=0, opcode QUERY, one uncompressed question and nothing
    after it but at most one version-0 OPT owned by the root that ends the message
    (RFC 6891 §6.1.1). Both the hot path and :func:`decode_query` read queries
    through this function, so they cannot disagree on what a query says; every
    message it declines is decoded (or refused) by ``decode_query``'s general path.
    """
    size = len(data)
    if size < 17:
        return None
    msg_id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & (QR | OPCODE_MASK) or qdcount != 1 or ancount or nscount or arcount > 1:
        return None
    offset = HEADER.size
    while True:
        if offset >= size:
            return None
        length = data[offset]
        if length == 0:
            break
        if length > MAX_LABEL:
            return None
        offset += 1 + length
    if offset + 1 - HEADER.size > MAX_NAME_WIRE:
        return None
    end = offset + 5
    if arcount:
        if size < end + 11 or data[end] != 0:
            return None
        rtype, payload, ttl, rdlength = RR_FIXED.unpack_from(data, end + 1)
        if rtype != TYPE_OPT or end + 11 + rdlength != size or ttl & 0xFF0000:
            return None
        do = bool(ttl & EDNS_DO)
        options = data[end + 11 :]
    elif end != size:
        return None
    else:
        payload, do, options = -1, False, b""
    return msg_id, flags, offset, payload, do, options


def decode_query(data: bytes) -> Query:
    """Decode one query message. Raises Drop, NotImplementedOpcode or FormatError."""
    common = scan_common(data)
    if common is not None:
        msg_id, flags, root, payload, do, options = common
        qtype, qclass = _QTAIL.unpack_from(data, root + 1)
        return Query(
            msg_id=msg_id,
            flags=flags,
            qname_wire=data[HEADER.size : root + 1],
            qtype=qtype,
            qclass=qclass,
            edns=Edns(payload, 0, do, options) if payload >= 0 else None,
            question=data[HEADER.size : root + 5],
        )
    return _decode_any(data)


def _decode_any(data: bytes) -> Query:
    """``decode_query`` for every shape ``scan_common`` declines."""
    if len(data) < HEADER.size:
        raise Drop("shorter than a DNS header")
    msg_id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        raise Drop("QR=1: a response, not a query")
    if flags & OPCODE_MASK:
        raise NotImplementedOpcode(msg_id, flags, _find_opt(data, qdcount, ancount + nscount, arcount))
    if qdcount != 1:
        found = _find_opt(data, qdcount, ancount + nscount, arcount)
        raise FormatError(msg_id, flags, f"QDCOUNT is {qdcount}, must be 1", found)
    try:
        qname_wire, offset = read_name(data, HEADER.size)
        if offset + 4 > len(data):
            raise ValueError("question type/class missing")
        qtype, qclass = _QTAIL.unpack_from(data, offset)
        question_end = offset + 4
        offset = question_end
        for _ in range(ancount + nscount):
            offset = _skip_rr(data, offset)
        edns: Edns | None = None
        for _ in range(arcount):
            rr_start = offset
            rtype, rclass, ttl, fixed, offset = read_rr(data, offset)
            if rtype == TYPE_OPT:
                # RFC 6891 §6.1.1: exactly one OPT, owned by the root name.
                if edns is not None:
                    raise ValueError("more than one OPT record")
                if data[rr_start] != 0:
                    raise ValueError("OPT record owner is not the root")
                edns = Edns(
                    udp_size=rclass,
                    version=(ttl >> 16) & 0xFF,
                    do=bool(ttl & EDNS_DO),
                    options=data[fixed + 10 : offset],
                )
    except ValueError as exc:
        raise FormatError(msg_id, flags, str(exc)) from None
    return Query(
        msg_id=msg_id,
        flags=flags,
        qname_wire=qname_wire,
        qtype=qtype,
        qclass=qclass,
        edns=edns,
        question=data[HEADER.size : question_end],
    )


def _find_opt(data: bytes, qdcount: int, records: int, arcount: int) -> Edns | None:
    """The OPT of any message, best effort: None when absent or undecodable.

    RFC 6891 §7: a reply to a request with OPT carries OPT, even a NOTIMP.
    """
    try:
        offset = HEADER.size
        for _ in range(qdcount):
            offset = skip_name(data, offset) + 4
        for _ in range(records):
            offset = _skip_rr(data, offset)
        for _ in range(arcount):
            rtype, rclass, ttl, _fixed, offset = read_rr(data, offset)
            if rtype == TYPE_OPT:
                return Edns(rclass, (ttl >> 16) & 0xFF, bool(ttl & EDNS_DO))
    except (ValueError, struct.error):
        return None
    return None


def read_rr(data: bytes, offset: int) -> tuple[int, int, int, int, int]:
    """The record at ``offset``: (type, class, TTL, offset of its fixed fields, end).

    The fixed fields (RFC 1035 §4.1.3) follow the owner name: TTL sits 4 bytes in,
    RDATA 10 bytes in. ValueError when the record runs past the end of ``data``.
    """
    fixed = skip_name(data, offset)
    if fixed + 10 > len(data):
        raise ValueError("record header runs past the end")
    rtype, rclass, ttl, rdlength = RR_FIXED.unpack_from(data, fixed)
    end = fixed + 10 + rdlength
    if end > len(data):
        raise ValueError("record data runs past the end")
    return rtype, rclass, ttl, fixed, end


def _skip_rr(data: bytes, offset: int) -> int:
    return read_rr(data, offset)[4]


def tcp_frame(message: bytes) -> bytes:
    """``message`` behind its two-byte length, as TCP carries it (RFC 1035 §4.2.2)."""
    return TCP_LENGTH.pack(len(message)) + message


def encode_error(msg_id: int, flags: int, rcode: int, opt: bytes = b"") -> bytes:
    """A reply without question: ID echoed, opcode and RD copied, QR set (RFC 1035 §4.1.1).

    ``opt`` is the OPT record to add when the request had one (RFC 6891 §7).
    """
    out_flags = QR | (flags & (OPCODE_MASK | RD)) | (rcode & 0xF)
    return HEADER.pack(msg_id, out_flags, 0, 0, 0, 1 if opt else 0) + opt


def short_reply(data: bytes, rcode: int, truncated: bool = False) -> bytes | None:
    """REFUSED, SERVFAIL or TC=1 built straight from a query's bytes: header and question.

    For the edge, before any decoding (rate limiting, access control, overload):
    None when the message is not a query with one readable question.
    """
    if len(data) < HEADER.size:
        return None
    msg_id, flags, qdcount = struct.unpack_from("!HHH", data)
    if flags & (QR | OPCODE_MASK) or qdcount != 1:
        return None
    try:
        _name, end = read_name(data, HEADER.size)
    except ValueError:
        return None
    end += 4  # type and class
    if end > len(data):
        return None
    out_flags = QR | (flags & (RD | CD)) | (rcode & 0xF) | (TC if truncated else 0)
    return HEADER.pack(msg_id, out_flags, 1, 0, 0, 0) + data[HEADER.size : end]
