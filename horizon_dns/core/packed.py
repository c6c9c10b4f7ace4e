"""Replies kept as wire bytes: what the cache stores and what upstreams send us.

A :class:`Packed` is a reply's record sections as bytes (answer, authority and
additional, without OPT), plus what is needed to serve it to any client asking
the same question: the section counts, the AA flag and rcode, and where every
TTL sits so an age can be subtracted in place. Compression pointers inside the
body point into the question, which has the same length for every client asking
the same (case-insensitive) name, so the body is reused as is behind a new header
and the client's own question bytes.

Contract:

* ``pack_records(question, qname_wire, sections)`` turns dnslib records into body
  bytes once and ``from_message`` indexes them (``core.encode.pack_reply`` does
  both for a Reply); ``unpack_records`` is the way back, for CNAME chasing;
* ``from_upstream(data, question_end)`` indexes an upstream's reply, drops its OPT
  and keeps its extended rcode and Extended DNS Error;
* ``bounded_ttls(packed, ...)`` rewrites TTLs (``core.ttl.ttl_rule`` decides the
  clamps): TTLs with the high bit set read as 0, clamps, and a
  negative answer's SOA TTL set to its negative-caching lifetime; ``lower_ttls``
  and ``with_ttls`` age or set them in place;
* ``serve(msg_id, flags, question, packed, opt, limit, ...)`` builds the message
  for one client: its ID, its RD/CD bits, its question, the OPT given (empty when
  it asked without EDNS), TC=1 with the question kept when over ``limit``. No
  dnslib objects are built.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from dnslib import RR, DNSBuffer, DNSLabel

from horizon_dns.core.edns import read_ede
from horizon_dns.core.wire import (
    AA,
    AD,
    CD,
    HEADER,
    NOERROR,
    NXDOMAIN,
    QR,
    RA,
    RD,
    RR_FIXED,
    TC,
    TYPE_OPT,
    read_rr,
    skip_name,
)

_TTL = struct.Struct("!I")
TYPE_SOA = 6
#: RFC 2181 §8: a TTL is 31 bits; one with the high bit set is read as 0.
TTL_MAX = 0x7FFFFFFF

# What we advertise and send over UDP at most: DNS Flag Day 2020's value, which
# avoids IP fragmentation on every common path.
DEFAULT_UDP_PAYLOAD = 1232
CLASSIC_UDP_LIMIT = 512  # RFC 1035 §4.2.1
TCP_LIMIT = 65535


@dataclass(slots=True, frozen=True)
class Packed:
    """A reply's record sections as bytes, servable to any client with the same question.

    TTLs are read from ``body`` at ``ttl_offsets``; everything but the body is the
    reply's *shape*, which many cached replies share (``with_body``).
    """

    body: bytes
    question_len: int  # length of the question section the body was packed behind
    ancount: int
    nscount: int
    arcount: int  # without OPT
    rcode: int  # 12-bit (RFC 6891 §6.1.3)
    flags: int  # AA and AD as received/decided
    ttl_offsets: tuple[int, ...]  # where in body every record's TTL sits
    ede: tuple[int, str] | None = None
    # A recursive upstream's answer: final as it is, its CNAMEs already followed
    # (RFC 1034 §4.3.2 chasing is for a server's own data).
    final: bool = False

    @property
    def ttls(self) -> tuple[tuple[int, int], ...]:
        """(offset in body, TTL) of every record."""
        body = self.body
        return tuple((off, _TTL.unpack_from(body, off)[0]) for off in self.ttl_offsets)

    @property
    def min_ttl(self) -> int | None:
        return min((ttl for _off, ttl in self.ttls), default=None)

    def with_body(self, body: bytes) -> Packed:
        """The same shape around another body (aged TTLs, or a cache entry's own bytes)."""
        return replace(self, body=body)

    def answers_with_cname(self) -> bool:
        """Whether the answer section holds a CNAME (RFC 1035 §3.2.2 type 5) left to
        chase, from the bytes; never for a ``final`` (forwarded) answer."""
        if self.final:
            return False
        body = self.body
        return any(body[off - 4 : off - 2] == b"\x00\x05" for off in self.ttl_offsets[: self.ancount])

    def negative_ttl(self) -> int | None:
        """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) of the SOA in authority, if any."""
        soa = self.negative_soa()
        return None if soa is None else min(soa[1], soa[2])

    def negative_soa(self) -> tuple[int, int, int] | None:
        """The first SOA in authority: where its TTL sits in the body, its TTL and its
        MINIMUM, both read as 0 when the high bit is set (RFC 2181 §8); None if none."""
        # Walk behind a zero prefix of the question's length so offsets match the body's.
        base = HEADER.size + self.question_len
        data = bytes(base) + self.body
        offset = base
        for index in range(self.ancount + self.nscount):
            offset = skip_name(data, offset)
            rtype, _rclass, ttl, rdlength = RR_FIXED.unpack_from(data, offset)
            ttl_offset = offset + 4 - base
            offset += 10 + rdlength
            if index >= self.ancount and rtype == TYPE_SOA:
                # MINIMUM is the last 32-bit field of the SOA rdata (RFC 1035 §3.3.13).
                (minimum,) = _TTL.unpack_from(data, offset - 4)
                return ttl_offset, _ttl31(ttl), _ttl31(minimum)
        return None


def _ttl31(ttl: int) -> int:
    """RFC 2181 §8: a TTL with the most significant bit set is treated as zero."""
    return ttl if ttl <= TTL_MAX else 0


def bounded_ttls(packed: Packed, low: int = 0, high: int = TTL_MAX, negative_cap: int = TTL_MAX) -> Packed:
    """``packed`` with its TTLs rewritten once, as they are to be served from then on.

    Every TTL with the high bit set becomes 0 (RFC 2181 §8), then every TTL is held to
    [``low``, ``high``]; in a negative answer (NXDOMAIN, or NOERROR with no answer) the
    SOA's TTL becomes the negative-caching lifetime min(SOA TTL, SOA MINIMUM,
    ``negative_cap``) (RFC 2308 §5), so it counts down to 0 when the entry expires.
    Returns ``packed`` itself when nothing changes. For the store and miss paths only.
    """
    body = packed.body
    new: dict[int, int] = {}
    for offset in packed.ttl_offsets:
        (ttl,) = _TTL.unpack_from(body, offset)
        bounded = max(low, min(_ttl31(ttl), high))
        if bounded != ttl:
            new[offset] = bounded
    if packed.rcode == NXDOMAIN or (packed.rcode == NOERROR and not packed.ancount):
        soa = packed.negative_soa()
        if soa is not None:
            offset, ttl, minimum = soa
            negative = min(new.get(offset, ttl), minimum, negative_cap)
            if negative != _TTL.unpack_from(body, offset)[0]:
                new[offset] = negative
            else:
                new.pop(offset, None)
    if not new:
        return packed
    rewritten = bytearray(body)
    for offset, ttl in new.items():
        _TTL.pack_into(rewritten, offset, ttl)
    return packed.with_body(bytes(rewritten))


def index_records(data: bytes, start: int, count: int) -> tuple[list[tuple[int, int]], int]:
    """TTL positions of ``count`` records from ``start``; return them and the end offset."""
    ttls: list[tuple[int, int]] = []
    offset = start
    for _ in range(count):
        _rtype, _rclass, ttl, fixed, offset = read_rr(data, offset)
        ttls.append((fixed + 4, ttl))
    return ttls, offset


class _PlainBuffer(DNSBuffer):  # type: ignore[misc]
    """A dnslib buffer that never compresses: the bytes stay valid at any offset."""

    def encode_name(self, name: object) -> None:
        self.encode_name_nocompress(name)


def record_wire(rr: RR) -> tuple[bytes, bytes]:
    """A record's owner (lowercased wire name) and the rest of its wire form, uncompressed.

    Remembered on the record object: records rendered by a template are reused for
    every query with the same rendered text, so each is packed once.
    """
    wire: tuple[bytes, bytes] | None = getattr(rr, "_horizon_wire", None)
    if wire is None:
        buf = _PlainBuffer()
        rr.pack(buf)
        data = bytes(buf.data)
        owner_end = skip_name(data, 0)
        wire = (data[:owner_end].lower(), data[owner_end:])
        rr._horizon_wire = wire
    return wire


_POINTER_TO_QUESTION = b"\xc0\x0c"  # RFC 1035 §4.1.4: the name at offset 12, the question's


def pack_records(query_question: bytes, qname_wire: bytes, sections: tuple[list, list, list]) -> bytes:  # type: ignore[type-arg]
    """Records behind a zeroed header and the question; the whole message.

    An owner equal to the question's name points to it, so answers carry the
    client's letter case and the message stays small; everything else is written
    in full, so no other offset matters.
    """
    qname = qname_wire.lower()
    parts = [b"\x00" * HEADER.size, query_question]
    for section in sections:
        for rr in section:
            owner, rest = record_wire(rr)
            parts.append(_POINTER_TO_QUESTION if owner == qname else owner)
            parts.append(rest)
    return b"".join(parts)


def from_message(
    data: bytes,
    question_end: int,
    counts: tuple[int, int, int],
    rcode: int,
    flags: int,
    ede: tuple[int, str] | None,
) -> Packed:
    """Index a message whose records start at ``question_end`` and contain no OPT."""
    ttls, _end = index_records(data, question_end, counts[0] + counts[1] + counts[2])
    base = question_end
    return Packed(
        body=data[question_end:],
        question_len=question_end - HEADER.size,
        ancount=counts[0],
        nscount=counts[1],
        arcount=counts[2],
        rcode=rcode,
        flags=flags & (AA | AD),
        ttl_offsets=tuple(off - base for off, _ttl in ttls),
        ede=ede,
    )


def from_upstream(data: bytes, question_end: int) -> Packed:
    """Index an upstream reply; drop its OPT, keeping the extended rcode and EDE.

    Raises ValueError when the message does not decode or its OPT is not the last
    record (moving records behind it could break their compression pointers).
    """
    _id, flags, _qd, ancount, nscount, arcount = HEADER.unpack_from(data)
    _ttls, offset = index_records(data, question_end, ancount + nscount)
    rcode = flags & 0xF
    ede: tuple[int, str] | None = None
    opt_span: tuple[int, int] | None = None
    for _ in range(arcount):
        start = offset
        rtype, _rclass, ttl, fixed, offset = read_rr(data, offset)
        if rtype == TYPE_OPT:
            if opt_span is not None:
                raise ValueError("more than one OPT record")
            opt_span = (start, offset)
            rcode |= (ttl >> 24) << 4  # RFC 6891 §6.1.3: upper 8 bits of the rcode
            ede = read_ede(data[fixed + 10 : offset])
    message = data[:offset]
    if opt_span is not None:
        if opt_span[1] != offset:
            raise ValueError("OPT is not the last record")
        message = data[: opt_span[0]]
        arcount -= 1
    return from_message(message, question_end, (ancount, nscount, arcount), rcode, flags, ede)


def response_flags(query_flags: int, packed_flags: int, rcode: int, recursion_available: bool) -> int:
    """QR set, RD/CD copied from the query (RFC 1035 §4.1.1, RFC 4035 §3.1.6)."""
    flags = QR | (query_flags & (RD | CD)) | (packed_flags & (AA | AD)) | (rcode & 0xF)
    if recursion_available:
        flags |= RA
    return flags


def with_ttls(data: bytes, offsets: tuple[int, ...], ttl: int) -> bytes:
    """``data`` with the TTL at each offset set to ``ttl`` (a stale answer's 30 s,
    RFC 8767 §4)."""
    aged = bytearray(data)
    for offset in offsets:
        _TTL.pack_into(aged, offset, ttl)
    return bytes(aged)


def lower_ttls(data: bytes, offsets: tuple[int, ...], by: int, base: int = 0) -> bytes:
    """``data`` with the TTL at ``base`` + each offset lowered by ``by`` seconds, floor
    0: a cached record's TTL counts down while it is held (RFC 1035 §3.2.1, §7.4)."""
    if not by:
        return data
    aged = bytearray(data)
    for offset in offsets:
        offset += base
        ttl = int.from_bytes(data[offset : offset + 4], "big") - by
        aged[offset : offset + 4] = (ttl if ttl > 0 else 0).to_bytes(4, "big")
    return bytes(aged)


def serve(
    msg_id: int,
    query_flags: int,
    question: bytes,
    packed: Packed,
    opt: bytes,
    limit: int,
    recursion_available: bool,
    body: bytes | None = None,
) -> bytes:
    """The message for one client; TC=1 with question and OPT kept when over ``limit``."""
    flags = response_flags(query_flags, packed.flags, packed.rcode, recursion_available)
    if body is None:
        body = packed.body
    size = HEADER.size + len(question) + len(body) + len(opt)
    if size <= limit:
        header = HEADER.pack(
            msg_id, flags, 1, packed.ancount, packed.nscount, packed.arcount + (1 if opt else 0)
        )
        return header + question + body + opt
    # RFC 2181 §9: TC=1 and no records; the client retries over TCP.
    return HEADER.pack(msg_id, flags | TC, 1, 0, 0, 1 if opt else 0) + question + opt


class _AnyOctetBuffer(DNSBuffer):  # type: ignore[misc]
    """A dnslib buffer that reads labels of any octets: dnslib refuses labels that are
    not UTF-8, but a DNS label is any 1-63 octets (RFC 2181 §11), and the question
    our records point to is the client's, whatever its bytes."""

    def decode_name(self, last: int = -1) -> DNSLabel:
        labels: list[bytes] = []
        offset: int = self.offset  # type: ignore[has-type]  # dnslib is untyped
        jumped, hops = False, 0
        data = bytes(self.data)
        while True:
            length = data[offset]
            if length >= 0xC0:  # RFC 1035 §4.1.4 pointer: only backwards, bounded
                pointer = ((length & 0x3F) << 8) | data[offset + 1]
                if not jumped:
                    self.offset = offset + 2
                jumped, hops = True, hops + 1
                if pointer >= offset or hops > 127:
                    raise ValueError("bad compression pointer")
                offset = pointer
                continue
            if length > 63:
                raise ValueError("bad label length")
            offset += 1
            if length == 0:
                break
            labels.append(data[offset : offset + length])
            offset += length
        if not jumped:
            self.offset = offset
        return DNSLabel(labels)


def unpack_records(question: bytes, packed: Packed) -> tuple[list[RR], list[RR], list[RR]]:
    """Decode a packed reply's sections into dnslib records (slow; for CNAME chasing)."""
    header = HEADER.pack(0, QR, 1, packed.ancount, packed.nscount, packed.arcount)
    buffer = _AnyOctetBuffer(header + question + packed.body)
    buffer.offset = HEADER.size + len(question)
    sections: tuple[list[RR], list[RR], list[RR]] = ([], [], [])
    for section, count in zip(sections, (packed.ancount, packed.nscount, packed.arcount), strict=True):
        for _ in range(count):
            section.append(RR.parse(buffer))
    return sections
