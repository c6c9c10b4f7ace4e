"""Bytes in, bytes out: the whole answer to one DNS message, with no socket.

Contract: ``await QueryHandler.handle(data, client, transport)`` returns the reply
bytes, or None when the message deserves silence (too short, QR=1). It never
raises: a stage that raises is logged and answered with SERVFAIL, so every
transport can stay a thin loop around this call.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from horizon_dns.core.encode import (
    DEFAULT_UDP_PAYLOAD,
    TCP_LIMIT,
    encode_reply,
    udp_limit,
)
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.pipeline import EDE_OTHER, Pipeline
from horizon_dns.core.wire import (
    BADVERS,
    FORMERR,
    NOTIMP,
    SERVFAIL,
    Drop,
    FormatError,
    NotImplementedOpcode,
    decode_query,
    encode_error,
)

log = logging.getLogger("horizon_dns.handler")

#: Called with every reply sent; metrics and the query log hang off this.
ReplyObserver = Callable[[Query, Reply, str], None]


class QueryHandler:
    """Decodes, resolves through the current pipeline, encodes."""

    def __init__(self, pipeline: Pipeline, udp_payload: int = DEFAULT_UDP_PAYLOAD) -> None:
        self.pipeline = pipeline
        self.udp_payload = udp_payload
        # (stage, outcome, reason) -> replies; plain ints, exported by a collector later.
        self.replies: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.malformed: collections.Counter[str] = collections.Counter()
        self.observers: list[ReplyObserver] = []

    async def handle(self, data: bytes, client: tuple[str, int] | None, transport: str) -> bytes | None:
        try:
            query = decode_query(data)
        except Drop:
            self.malformed["dropped"] += 1
            return None
        except NotImplementedOpcode as exc:
            self.malformed["notimp"] += 1
            return encode_error(exc.msg_id, exc.flags, NOTIMP)
        except FormatError as exc:
            self.malformed["formerr"] += 1
            log.debug("FORMERR to %s: %s", client, exc)
            return encode_error(exc.msg_id, exc.flags, FORMERR)
        query.client = client
        query.transport = transport
        return await self.answer(query)

    async def answer(self, query: Query) -> bytes:
        """Resolve a decoded query and encode the reply for its transport."""
        limit = TCP_LIMIT if query.transport == "tcp" else udp_limit(query, self.udp_payload)
        pipeline = self.pipeline  # a reload swaps this; the query stays on the one it started on
        if query.edns is not None and query.edns.version > 0:
            # RFC 6891 §6.1.3: we implement version 0 only.
            reply = Reply(BADVERS, "edge", Outcome.OTHER, "badvers")
            recursion = False
        else:
            try:
                reply, zone = await pipeline.resolve(query)
                recursion = zone is not None and zone.recursion_available
            except Exception as exc:  # a stage bug must not take the server down
                log.exception("stage failed on %s %s", query.name, query.type_name)
                reply = Reply(
                    SERVFAIL,
                    "edge",
                    Outcome.FAILED,
                    "stage-error",
                    ede=(EDE_OTHER, f"internal error: {type(exc).__name__}"),
                )
                recursion = False
        self.replies[(reply.stage, reply.outcome.value, reply.reason)] += 1
        for observer in self.observers:
            observer(query, reply, query.transport)
        try:
            return encode_reply(query, reply, limit, recursion, self.udp_payload)
        except Exception:
            log.exception("could not encode the reply to %s %s", query.name, query.type_name)
            self.replies[("edge", Outcome.FAILED.value, "encode-error")] += 1
            fallback = Reply(SERVFAIL, "edge", Outcome.FAILED, "encode-error")
            return encode_reply(query, fallback, limit, recursion, self.udp_payload)
