"""Turn a :class:`Reply` into wire bytes for one client, within its size limit.

Contract: ``encode_reply(query, reply, limit, recursion_available)`` returns a
complete message that echoes the query's ID, RD and CD bits and its question
section byte for byte (so the client's letter case survives, RFC 1035 §7.3),
adds an OPT record when and only when the query had one (RFC 6891 §7), and --
when the message does not fit ``limit`` -- sets TC and keeps the question and
OPT but drops every record (RFC 2181 §9, RFC 6891 §7). dnslib's own
``truncate()`` drops the question too, which breaks clients that match replies
by question (systemd-resolved among them), hence this module.
"""

from __future__ import annotations

from dnslib import DNSBuffer

from horizon_dns.core.message import Query, Reply
from horizon_dns.core.wire import AA, CD, HEADER, QR, RA, RD, TC, encode_opt

# What we tell clients we accept and send over UDP: the DNS Flag Day 2020 value,
# which avoids IP fragmentation on every common path.
DEFAULT_UDP_PAYLOAD = 1232
# RFC 1035 §4.2.1: without EDNS a UDP message is at most 512 bytes.
CLASSIC_UDP_LIMIT = 512
TCP_LIMIT = 65535

EDE_OPTION = 15  # RFC 8914 §2


def udp_limit(query: Query, max_payload: int = DEFAULT_UDP_PAYLOAD) -> int:
    """Largest UDP reply for this client: its EDNS size (at least 512), capped by ours."""
    if query.edns is None:
        return CLASSIC_UDP_LIMIT
    return max(CLASSIC_UDP_LIMIT, min(query.edns.udp_size, max_payload))


def _opt_for(query: Query, reply_rcode: int, ede: tuple[int, str] | None, payload: int) -> bytes:
    assert query.edns is not None
    options = b""
    if ede is not None:
        code, text = ede
        body = code.to_bytes(2, "big") + text.encode("utf-8")
        options = EDE_OPTION.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    # RFC 3225 §3: the DO bit of the query is copied into the response.
    return encode_opt(payload, reply_rcode >> 4, query.edns.do, options)


def _flags(query: Query, rcode: int, authoritative: bool, recursion_available: bool) -> int:
    flags = QR | (query.flags & (RD | CD)) | (rcode & 0xF)
    if authoritative:
        flags |= AA
    if recursion_available:
        flags |= RA
    return flags


def encode_reply(
    query: Query,
    reply: Reply,
    limit: int,
    recursion_available: bool,
    payload: int = DEFAULT_UDP_PAYLOAD,
) -> bytes:
    """Pack ``reply`` as the answer to ``query``; truncate (TC=1) if over ``limit``."""
    rcode = reply.rcode
    flags = _flags(query, rcode, reply.authoritative, recursion_available)
    opt = _opt_for(query, rcode, reply.ede, payload) if query.edns is not None else b""
    buf = DNSBuffer()
    buf.append(b"\x00" * HEADER.size)
    _append_question(buf, query)
    for rr in reply.answer:
        rr.pack(buf)
    for rr in reply.authority:
        rr.pack(buf)
    for rr in reply.additional:
        rr.pack(buf)
    arcount = len(reply.additional)
    if opt:
        buf.append(opt)
        arcount += 1
    data = bytes(buf.data)
    if len(data) <= limit:
        header = HEADER.pack(query.msg_id, flags, 1, len(reply.answer), len(reply.authority), arcount)
        return header + data[HEADER.size :]
    return truncated(query, flags, opt)


def truncated(query: Query, flags: int, opt: bytes) -> bytes:
    """TC=1 with the question (and OPT) kept, every record dropped (RFC 2181 §9)."""
    header = HEADER.pack(query.msg_id, flags | TC, 1, 0, 0, 1 if opt else 0)
    return header + query.question + opt


def _append_question(buf: DNSBuffer, query: Query) -> None:
    """Write the question as received and let later names compress against it."""
    offset = HEADER.size
    wire = query.qname_wire
    labels: list[bytes] = []
    positions: list[int] = []
    i = 0
    while wire[i]:
        positions.append(offset + i)
        labels.append(wire[i + 1 : i + 1 + wire[i]].lower())
        i += 1 + wire[i]
    buf.append(query.question)
    # dnslib keys its compression table by label tuples; register every suffix.
    for n, pos in enumerate(positions):
        buf.names.setdefault(tuple(labels[n:]), pos)
