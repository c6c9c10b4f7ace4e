"""Turn a :class:`Reply` into wire bytes for one client, within its size limit.

Contract: ``encode_reply(query, reply, limit, recursion_available)`` returns a
complete message that echoes the query's ID, RD and CD bits and its question
section byte for byte (so the client's letter case survives, RFC 1035 §7.3),
adds an OPT record when and only when the query had one (RFC 6891 §7), and --
when the message does not fit ``limit`` -- sets TC and keeps the question and
OPT but drops every record (RFC 2181 §9, RFC 6891 §7). dnslib's own
``truncate()`` drops the question too, which breaks clients that match replies
by question (systemd-resolved among them), hence :mod:`horizon_dns.core.packed`.
"""

from __future__ import annotations

from dataclasses import replace

from horizon_dns.core.edns import encode_opt
from horizon_dns.core.message import Query, Reply
from horizon_dns.core.packed import (
    CLASSIC_UDP_LIMIT,
    DEFAULT_UDP_PAYLOAD,
    TCP_LIMIT,
    Packed,
    from_message,
    pack_records,
    serve,
    unpack_records,
)
from horizon_dns.core.wire import AA, HEADER

__all__ = [
    "CLASSIC_UDP_LIMIT", "DEFAULT_UDP_PAYLOAD", "TCP_LIMIT", "as_records", "encode_reply", "pack_reply",
    "udp_limit",
]  # fmt: skip


def udp_limit(query: Query, max_payload: int = DEFAULT_UDP_PAYLOAD) -> int:
    """Largest UDP reply for this client: its EDNS size (at least 512), capped by ours."""
    if query.edns is None:
        return CLASSIC_UDP_LIMIT
    return max(CLASSIC_UDP_LIMIT, min(query.edns.udp_size, max_payload))


def pack_reply(query: Query, reply: Reply) -> Packed:
    """The reply's records packed once behind the query's question."""
    if reply.packed is not None:
        if reply.has_records():
            raise ValueError(f"{reply.stage}: a reply holds records and bytes at once")
        return reply.packed
    message = pack_records(
        query.question, query.qname_wire, (reply.answer, reply.authority, reply.additional)
    )
    counts = (len(reply.answer), len(reply.authority), len(reply.additional))
    flags = AA if reply.authoritative else 0
    return from_message(message, HEADER.size + len(query.question), counts, reply.rcode, flags, reply.ede)


def as_records(query: Query, reply: Reply) -> Reply:
    """``reply`` in record form, decoded from its bytes when it holds bytes (slow, ~30
    µs: for CNAME chasing and for tests, never for the answer path)."""
    if reply.packed is None:
        return reply
    answer, authority, additional = unpack_records(query.question, reply.packed)
    return replace(
        reply, packed=None, answer=answer, authority=authority, additional=additional,
        authoritative=bool(reply.packed.flags & AA), ede=reply.ede or reply.packed.ede,
    )  # fmt: skip


def encode_reply(
    query: Query,
    reply: Reply,
    limit: int,
    recursion_available: bool,
    payload: int = DEFAULT_UDP_PAYLOAD,
    nsid: bytes | None = None,
) -> bytes:
    """Pack ``reply`` as the answer to ``query``; truncate (TC=1) if over ``limit``.

    ``nsid`` is the RFC 5001 name-server identifier, for a query that asked for it.
    """
    packed = pack_reply(query, reply)
    opt = b""
    if query.edns is not None:
        # RFC 3225 §3: the DO bit of the query is copied into the response.
        opt = encode_opt(payload, packed.rcode, query.edns.do, reply.ede or packed.ede, nsid)
    return serve(query.msg_id, query.flags, query.question, packed, opt, limit, recursion_available)
