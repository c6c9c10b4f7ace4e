"""Bytes in, bytes out: the whole answer to one DNS message, with no socket.

Contract: ``await QueryHandler.handle(data, client, transport)`` returns the reply
bytes, or None when the message deserves silence (too short, QR=1). It never
raises: a stage that raises is logged and answered with SERVFAIL, so every
transport can stay a thin loop around this call.

``QueryHandler.hot_answer(data, tcp)`` is the synchronous hot path (and
``hot_answer_known(data, now)`` its first step alone, for a batch): for the
common query shape (``wire.scan_common``, which the full path reads queries
through too) in a zone whose first stage is a cache holding a fresh entry, it
returns the reply bytes without decoding to objects, creating a task or
awaiting; for anything else it returns None and the caller takes the full path.
It returns nothing or exactly the full path's bytes: ``tests/test_hot_path.py``
checks that for any bytes, cache state and client (DECISIONS.md 5).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from dnslib import RR, TXT

from horizon_dns.core.bounded import remember
from horizon_dns.core.clock import now as clock_now
from horizon_dns.core.edns import EDE_OTHER, OPTION_NSID, encode_opt, find_option
from horizon_dns.core.encode import (
    CLASSIC_UDP_LIMIT,
    DEFAULT_UDP_PAYLOAD,
    TCP_LIMIT,
    encode_reply,
    udp_limit,
)
from horizon_dns.core.message import Outcome, Query, Reply, qtype_name
from horizon_dns.core.packed import lower_ttls, serve
from horizon_dns.core.pipeline import Pipeline
from horizon_dns.core.stage import HotCache
from horizon_dns.core.stats import Histogram
from horizon_dns.core.wire import (
    BADVERS,
    CD,
    FORMERR,
    HEADER,
    NOERROR,
    NOTIMP,
    SERVFAIL,
    Drop,
    FormatError,
    NotImplementedOpcode,
    cache_key,
    decode_query,
    encode_error,
    scan_common,
)

log = logging.getLogger("horizon_dns.handler")

#: Called with every reply of the full path: (query, reply, zone name, seconds taken).
ReplyObserver = Callable[[Query, Reply, str, float], None]

#: Types counted under their own label; everything else is "other" (bounded cardinality).
COUNTED_TYPES = frozenset(
    {
        "A",
        "AAAA",
        "CNAME",
        "MX",
        "TXT",
        "PTR",
        "SRV",
        "NS",
        "SOA",
        "HTTPS",
        "SVCB",
        "ANY",
        "CAA",
        "DS",
        "DNSKEY",
    }
)
#: Type code -> its label in the responses metric.
# RFC 4892 §2: the CHAOS names that ask a server who it is (its version it keeps to itself).
_IDENTITY = frozenset({"id.server.", "hostname.bind."})
CLASS_CH, TYPE_TXT = 3, 16

_TYPE_LABELS = {
    code: name for code, name in ((c, qtype_name(c)) for c in range(1, 260)) if name in COUNTED_TYPES
}
HOT_REPLIES_MAX = 4096  # the hot set; beyond it the cache's own path (~3 µs more) serves


#: A reply the hot path keeps for one query's bytes after the ID: (exact until,
#: reply bytes after the ID, where its records start in them, the TTL offsets from
#: there, and the cache, key, entry and entry age in seconds it was built from).
HotReply = tuple[float, bytes, int, tuple[int, ...], HotCache, bytes, object, int]


def _renewed(known: HotReply) -> HotReply | None:
    """The kept reply with its TTLs aged to now, while its cache entry is still
    current and fresh; None when the reply must be built again."""
    _valid, reply, base, ttls, cache, key, entry, age = known
    current = cache.current_age(key, entry)
    if current is None:
        return None
    now_age, until = current
    # RFC 1035 §3.2.1: the TTLs the client sees count down with the entry's age.
    reply = lower_ttls(reply, ttls, now_age - age, base)
    return (until, reply, base, ttls, cache, key, entry, now_age)


class QueryHandler:
    """Decodes, resolves through the current pipeline, encodes."""

    def __init__(self, pipeline: Pipeline, udp_payload: int = DEFAULT_UDP_PAYLOAD, nsid: str = "") -> None:
        # Query bytes after the ID -> a HotReply: the same question with the
        # same flags and EDNS gets the same bytes until its cache entry's age changes
        # (at most a second), then those bytes with their TTLs lowered while the cache
        # entry they came from stays. One dict lookup instead of a scan.
        # Kept apart per transport: a UDP reply may be truncated where a TCP one is not.
        self._hot_replies: dict[bytes, HotReply] = {}
        self._hot_replies_tcp: dict[bytes, HotReply] = {}
        self._pipeline = pipeline
        self.udp_payload = udp_payload
        #: RFC 5001: what `dig +nsid` is told; the node's name, so it says which node answered.
        self.nsid = nsid.encode("utf-8")
        # Plain ints, exported by horizon_dns.metrics at scrape time.
        self.replies: collections.Counter[tuple[str, str, str]] = (
            collections.Counter()
        )  # stage, outcome, reason
        self.responses: collections.Counter[tuple[str, str, str, int]] = collections.Counter()
        self.durations: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.malformed: collections.Counter[str] = collections.Counter()
        self.observers: list[ReplyObserver] = []
        self._hot_enabled = True
        #: Whether the hot path may answer at all, kept as one flag: it is read per query.
        self._hot = pipeline.has_hot_path
        self.hot_hits = 0

    @property
    def pipeline(self) -> Pipeline:
        return self._pipeline

    @pipeline.setter
    def pipeline(self, pipeline: Pipeline) -> None:
        """A reload: the hot path's replies belong to the old configuration."""
        self._pipeline = pipeline
        self._hot = self._hot_enabled and pipeline.has_hot_path
        self.forget_hot_replies()

    @property
    def hot_enabled(self) -> bool:
        """False while something must see every query (the query log): all take the full path."""
        return self._hot_enabled

    @hot_enabled.setter
    def hot_enabled(self, enabled: bool) -> None:
        self._hot_enabled = enabled
        self._hot = enabled and self._pipeline.has_hot_path

    def forget_hot_replies(self) -> None:
        """Drop every reply the hot path keeps (the horizon moved: their entries are gone)."""
        self._hot_replies = {}
        self._hot_replies_tcp = {}

    def hot_answer_known(self, data: bytes, now: float) -> bytes | None:
        """The UDP reply the hot path keeps for ``data``, still valid at ``now``, or None.

        The first try of the batched listener, for clients it has already screened:
        one dict lookup, no parsing. Everything else (renewal included) is
        ``hot_answer``'s."""
        if not self._hot:
            return None
        known = self._hot_replies.get(data[2:])
        if known is None or known[0] <= now:
            return None
        self.hot_hits += 1
        return data[:2] + known[1]

    def hot_answer(self, data: bytes, tcp: bool = False) -> bytes | None:
        """The reply from a leading cache's fresh entry, or None to take the full path."""
        if not self._hot:
            return None
        replies = self._hot_replies_tcp if tcp else self._hot_replies
        tail = data[2:]
        known = replies.get(tail)
        if known is not None:
            now = clock_now()
            if known[0] > now:
                self.hot_hits += 1
                return data[:2] + known[1]
            renewed = _renewed(known)
            if renewed is not None:
                replies[tail] = renewed
                self.hot_hits += 1
                return data[:2] + renewed[1]
            del replies[tail]
        common = scan_common(data)
        if common is None:
            return None
        msg_id, flags, root, payload, do, options = common
        if payload >= 0:
            if options and find_option(options, OPTION_NSID) is not None:
                return None  # the full path adds the NSID
            limit = TCP_LIMIT if tcp else max(CLASSIC_UDP_LIMIT, min(payload, self.udp_payload))
        else:
            limit = TCP_LIMIT if tcp else CLASSIC_UDP_LIMIT
        question_end = root + 5
        if data[question_end - 1] == CLASS_CH:
            return None  # CHAOS names the full path answers itself (RFC 4892)
        lower = data[12 : root + 1].lower()
        found = self.pipeline.zone_for_wire(lower)
        if found is None:
            return None
        zone, cache = found
        if cache is None:
            return None
        key = cache_key(lower, data[root + 1 : question_end], do, bool(flags & CD))
        hit = cache.serve_fresh(key)
        if hit is None:
            return None
        # A final reply: chased and fallen back before it was stored.
        packed, body, until, entry, age = hit
        opt = b""
        if payload >= 0:
            opt = encode_opt(self.udp_payload, packed.rcode, do, packed.ede)
        self.hot_hits += 1
        question = data[12:question_end]
        reply = serve(msg_id, flags, question, packed, opt, limit, zone.recursion_available, body)
        # Where the records start in the reply bytes after the ID; a truncated reply has none.
        base = HEADER.size - 2 + len(question)
        ttls = packed.ttl_offsets if len(reply) > base + 2 + len(opt) else ()
        # Kept exactly as long as the full path would build the same bytes: until the
        # entry's age (hence every TTL) next changes, or it expires.
        remember(replies, tail, (until, reply[2:], base, ttls, cache, key, entry, age), HOT_REPLIES_MAX)
        return reply

    async def handle(self, data: bytes, client: tuple[str, int] | None, transport: str) -> bytes | None:
        try:
            query = decode_query(data)
        except Drop:
            self.malformed["dropped"] += 1
            return None
        except NotImplementedOpcode as exc:
            self.malformed["notimp"] += 1
            opt = b""
            if exc.edns is not None:
                opt = encode_opt(self.udp_payload, NOTIMP, exc.edns.do, None)
            return encode_error(exc.msg_id, exc.flags, NOTIMP, opt)
        except FormatError as exc:
            self.malformed["formerr"] += 1
            log.debug("FORMERR to %s: %s", client, exc)
            opt = b""
            if exc.edns is not None:
                # RFC 6891 §7: a request with a readable OPT gets one back, even a FORMERR.
                opt = encode_opt(self.udp_payload, FORMERR, exc.edns.do, None)
            return encode_error(exc.msg_id, exc.flags, FORMERR, opt)
        query.client = client
        query.transport = transport
        guard = self.pipeline.guard
        if guard.probes and guard.arrived(query.name):
            # Our own loop probe came back: answer at once so the loop ends here.
            log.debug("loop probe %s arrived from %s", query.name, client)
            reply = Reply(SERVFAIL, "edge", Outcome.FAILED, "loop-probe")
            return encode_reply(query, reply, TCP_LIMIT if transport == "tcp" else udp_limit(query), False)
        return await self.answer(query)

    async def answer(self, query: Query) -> bytes:
        """Resolve a decoded query and encode the reply for its transport."""
        started = time.perf_counter()
        limit = TCP_LIMIT if query.transport == "tcp" else udp_limit(query, self.udp_payload)
        pipeline = self.pipeline  # a reload swaps this; the query stays on the one it started on
        zone_name = "-"
        if query.edns is not None and query.edns.version > 0:
            # RFC 6891 §6.1.3: we implement version 0 only.
            reply = Reply(BADVERS, "edge", Outcome.OTHER, "badvers")
            recursion = False
        elif query.qclass == CLASS_CH and query.qtype == TYPE_TXT and self.nsid and query.name in _IDENTITY:
            # RFC 4892 §2-3: which server answered, the node's name as NSID says it.
            identity = RR(query.name, TYPE_TXT, CLASS_CH, 0, TXT(self.nsid))
            reply = Reply(NOERROR, "edge", Outcome.ANSWER, "identity", answer=[identity], authoritative=True)
            recursion = False
        else:
            try:
                reply, zone = await pipeline.resolve(query)
                recursion = zone is not None and zone.recursion_available
                zone_name = zone.name if zone is not None else "-"
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
        self.replies[(reply.stage, reply.outcome._value_, reply.reason)] += 1
        type_label = _TYPE_LABELS.get(query.qtype, "other")
        self.responses[(zone_name, query.transport, type_label, reply.rcode)] += 1
        elapsed = time.perf_counter() - started
        self.durations[zone_name].observe(elapsed)
        for observer in self.observers:
            observer(query, reply, zone_name, elapsed)
        nsid = None
        if self.nsid and query.edns is not None and find_option(query.edns.options, OPTION_NSID) is not None:
            nsid = self.nsid
        try:
            return encode_reply(query, reply, limit, recursion, self.udp_payload, nsid)
        except Exception:
            log.exception("could not encode the reply to %s %s", query.name, query.type_name)
            self.replies[("edge", Outcome.FAILED.value, "encode-error")] += 1
            fallback = Reply(SERVFAIL, "edge", Outcome.FAILED, "encode-error")
            return encode_reply(query, fallback, limit, recursion, self.udp_payload, nsid)
