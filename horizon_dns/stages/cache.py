"""The ``cache`` stage: replies kept as packed bytes, served with TTLs aged in place.

YAML::

    - cache:
        max_entries: 10000        # beyond this the least recently used go (CLOCK)
        min_ttl: 0                # clamp of positive TTLs (seconds)
        max_ttl: 86400
        max_negative_ttl: 3600    # NXDOMAIN/NODATA, from the SOA (RFC 2308 §5)
        servfail_ttl: 1           # resolution failures (RFC 9520 §3.2; 0: off, at most 300)
        serve_stale: true         # RFC 8767: expired answers when what follows fails
        max_stale: 86400          # how long past expiry an answer may still be served

Contract: the key is the lowercased name, type, class and the DO and CD bits.
Positive answers live for their smallest TTL, clamped; NXDOMAIN and NODATA for
min(SOA TTL, SOA MINIMUM, max_negative_ttl) and are not cached without an SOA
(RFC 2308 §5); SERVFAIL for ``servfail_ttl`` seconds (RFC 9520 §3.2: at least 1 s;
RFC 2308 §7.1: at most 5 minutes), unless an expired answer could still be served
stale; REFUSED, truncated and client-specific replies are not cached. TTLs are
rewritten once, when a reply passes the cache on its way to the client and is
stored: clamped, 0 for those with the high bit set (RFC 2181 §8), and a negative
answer's SOA TTL set to the entry's lifetime -- so the first client sees what
later hits show, and TTLs never rise from one reply to the next. A hit
is the stored bytes with every TTL lowered by the entry's age, counted in whole
seconds rounded up (a TTL never outlives the entry) -- no dnslib object
is built -- and, first in a zone, is served by the server's synchronous hot path
(:meth:`CacheStage.serve_fresh`) without a task. Concurrent misses for one key
wait for a single call of the next stage. When that call fails (SERVFAIL) and an
expired entry is at most ``max_stale`` old, the entry is served with TTL 30 and
Extended DNS Error 3, "Stale Answer" (RFC 8767 §4, RFC 8914 §4.4).
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Callable, Iterator
from dataclasses import replace

from horizon_dns.config.source import Section, as_bool, int_range
from horizon_dns.core import clock as clocks
from horizon_dns.core.bounded import remember
from horizon_dns.core.edns import EDE_STALE_ANSWER
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.packed import Packed, lower_ttls, with_ttls
from horizon_dns.core.stage import Next
from horizon_dns.core.stats import Sample, counter, gauge
from horizon_dns.core.ttl import ttl_rule
from horizon_dns.core.wire import CD, NOERROR, NXDOMAIN, SERVFAIL, cache_key
from horizon_dns.stages.context import BuildContext

STALE_TTL = 30  # RFC 8767 §4: "a TTL of 30 seconds is recommended"
STALE_RECHECK = 30.0  # RFC 8767 §5: after a failed refresh, serve stale that long before retrying
_TYPE_CLASS = struct.Struct("!HH")


# Stored and expires, in tenths of a second since the cache's epoch: 8 bytes an entry
# where two floats take 16 (and 48 as objects); 2**32 tenths are 13 years.
_TIMES = struct.Struct("=II")
_TICKS = 10
# A stored time is kept 0.9 s early, so the hit path's int() of an age in seconds
# rounds it up and the TTLs served are the remaining time floored: a TTL-3 record
# fetched 1.2 s ago shows 1, not 2 (RFC 1035 §3.2.1). Free on the hit path.
_EARLY = 9
_SHAPES_MAX = 4096


#: A cached reply's form shared by many entries: its Packed without body, its outcome,
#: and, when the overlay owns its name, the overlay's bound (``Reply.overlay_ttl``).
Shape = tuple[Packed, Outcome, int | None]


class Entry:
    """One cached reply in ~130 bytes: a shared shape (the reply's form, its outcome
    and, when the overlay owns its name, the overlay's bound),
    one bytes object holding when it was stored, when it expires (ticks of the
    cache's clock) and the record bytes, and whether it was used since the
    eviction sweep last passed it.

    Per entry, separate floats, a Packed and its TTL tuples cost ~400 bytes more
    (bench/RESULTS.md, memory); 100k entries must fit in tens of MiB.
    """

    __slots__ = ("blob", "shape", "used")

    def __init__(self, shape: Shape, blob: bytes) -> None:
        self.shape = shape  # shared by entries of the same form; its Packed has no body
        self.blob = blob
        self.used = False

    @property
    def outcome(self) -> Outcome:
        return self.shape[1]

    @property
    def overlay(self) -> bool:
        """The overlay owns the name: never served stale, dropped when the horizon moves."""
        return self.shape[2] is not None


def query_key(query: Query) -> bytes:
    """The query's cache key, by the rule the hot path uses too (``wire.cache_key``)."""
    do = query.edns.do if query.edns is not None else False
    type_class = _TYPE_CLASS.pack(query.qtype, query.qclass)
    return cache_key(query.qname_wire.lower(), type_class, do, bool(query.flags & CD))


class CacheStage:
    """Packed replies in front of the stages that follow it, least recently used out first."""

    recurses = False

    def __init__(
        self,
        name: str = "cache",
        max_entries: int = 10000,
        min_ttl: int = 0,
        max_ttl: int = 86400,
        max_negative_ttl: int = 3600,
        serve_stale: bool = True,
        max_stale: int = 86400,
        clock: Callable[[], float] = clocks.now,
        servfail_ttl: int = 1,
    ) -> None:
        self.name = name
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.serve_stale = serve_stale
        self.max_stale = max_stale
        self.servfail_ttl = servfail_ttl
        #: Key -> until when a failed refresh is not tried again (RFC 8767 §5).
        self.recheck: dict[bytes, float] = {}
        self.clock = clock
        # A second before now, so a stored time kept _EARLY ticks early stays >= 0.
        self.epoch = clock() - 1.0
        # A plain dict in insertion order, evicted by CLOCK (second chance): a hit only
        # marks the entry used; the sweep from the oldest end moves used entries to the
        # end unmarked and drops the first unused ones. No dict write per hit (a dict
        # re-inserted into on every hit doubles its table), ~50 bytes an entry less
        # than an OrderedDict.
        self.entries: dict[bytes, Entry] = {}
        self.inflight: dict[bytes, asyncio.Future[Reply]] = {}
        self._shapes: dict[Shape, Shape] = {}
        self.hits = self.misses = self.evictions = self.stale_served = self.coalesced = 0
        # First in its zone: the zone stores final replies (chased, fallen back) via
        # store_final(), so the hot path can serve them whole; the chain stores nothing.
        self.leading = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        for future in self.inflight.values():
            future.cancel()

    def stats(self, zone: str) -> Iterator[Sample]:
        """Hits, misses, evictions, stale serves, coalesced misses, entries."""
        labels = {"zone": zone, "stage": self.name}
        yield counter("cache_hits", "Cache hits.", self.hits, **labels)
        yield counter("cache_misses", "Cache misses.", self.misses, **labels)
        yield counter("cache_evictions", "Entries evicted at max_entries.", self.evictions, **labels)
        yield counter("cache_stale", "Expired answers served stale (RFC 8767).", self.stale_served, **labels)
        yield counter("cache_coalesced", "Misses that joined one in flight.", self.coalesced, **labels)
        yield gauge("cache_entries", "Entries in the cache.", len(self.entries), **labels)

    def settings(self) -> tuple[int, int, int, int, bool, int, int]:
        """Everything that decides what is stored; equal settings may share entries."""
        return (
            self.max_entries, self.min_ttl, self.max_ttl, self.max_negative_ttl, self.serve_stale,
            self.max_stale, self.servfail_ttl,
        )  # fmt: skip

    # The synchronous hot path ------------------------------------------------

    def serve_fresh(self, key: bytes) -> tuple[Packed, bytes, float, Entry, int] | None:
        """A fresh entry's shape (a Packed without body), its aged body, until when
        that body stays exact (the entry's age next changes or it expires), the entry
        itself and its age in whole seconds; None on a miss."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        fresh = self._age(entry)
        if fresh is None:
            return None
        age, exact_until = fresh
        # The shape serves as the Packed: the hot path takes the body separately.
        shape = entry.shape[0]
        body = lower_ttls(entry.blob[_TIMES.size :], shape.ttl_offsets, age)
        return shape, body, exact_until, entry, age

    def current_age(self, key: bytes, entry: Entry) -> tuple[int, float] | None:
        """``entry``'s age in whole seconds and until when that age holds, while it is
        still the fresh entry of ``key``; None once it was replaced, evicted or expired.
        Lets a reply built from the entry be reused with its TTLs lowered by the
        difference."""
        if self.entries.get(key) is not entry:
            return None
        return self._age(entry)

    def _age(self, entry: Entry) -> tuple[int, float] | None:
        """A hit on ``entry``: its age in whole seconds and until when that age holds
        (the next whole second of age, or expiry), or None when it has expired."""
        now = self.clock()
        stored, expires = _TIMES.unpack_from(entry.blob)
        born = self.epoch + stored / _TICKS
        until = self.epoch + expires / _TICKS
        if now >= until:
            return None
        entry.used = True
        self.hits += 1
        age = int(now - born)
        return age, min(born + age + 1, until)

    # The stage ---------------------------------------------------------------

    async def handle(self, query: Query, next: Next) -> Reply:
        key = query_key(query)
        fresh = self.serve_fresh(key)
        if fresh is not None:
            packed, body, _until, entry, _age = fresh
            query.note(f"  cache hit ({len(self.entries)} entries)")
            return Reply(
                packed.rcode, self.name, entry.outcome, "cache:hit",
                packed=packed.with_body(body), overlay_ttl=entry.shape[2],
            )  # fmt: skip
        self.misses += 1
        recheck = self.recheck.get(key)
        if recheck is not None:
            if self.clock() < recheck:
                # RFC 8767 §5, failure recheck timer: refreshing this entry failed moments
                # ago; answer stale at once rather than wait out the upstreams again.
                stale = self._stale(key, query)
                if stale is not None:
                    return stale
            del self.recheck[key]
        waiting = self.inflight.get(key)
        if waiting is not None:
            self.coalesced += 1
            query.note("  cache miss: joining an identical query in flight")
            return await asyncio.shield(waiting)
        query.note("  cache miss")
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.inflight[key] = future
        try:
            reply = await next(query)
            if reply.rcode == SERVFAIL:
                stale = self._stale(key, query)
                if stale is not None:
                    reply = stale
                    remember(self.recheck, key, self.clock() + STALE_RECHECK, self.max_entries)
                elif not self.leading:
                    self.store(key, query, reply)  # the failure, for servfail_ttl
            else:
                # The miss path: the client sees the TTLs later hits will show.
                reply = self._bounded(query, reply)
                if not self.leading:
                    self.store(key, query, reply)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters re-raise it
            raise
        finally:
            del self.inflight[key]
        if not future.done():  # stop() may have cancelled it
            future.set_result(reply)
        return reply

    def _stale(self, key: bytes, query: Query) -> Reply | None:
        entry = self.entries.get(key)
        if entry is None or not self.serve_stale or entry.outcome is Outcome.FAILED:
            return None
        if entry.overlay:
            # Serve-stale is for public data (RFC 8767 §4 speaks of upstream
            # authorities): an overlay answer past its bound is exactly what the
            # horizon switch must not hand out.
            query.note("  what follows failed; the overlay owns this name: no stale answer")
            return None
        if self.clock() > self.lifetime(entry)[1] + self.max_stale:
            del self.entries[key]
            return None
        self.stale_served += 1
        query.note("  what follows failed: serving the expired entry (RFC 8767)")
        shape = entry.shape[0]
        body = with_ttls(entry.blob[_TIMES.size :], shape.ttl_offsets, STALE_TTL)
        packed = replace(shape, body=body, ede=(EDE_STALE_ANSWER, "stale answer: upstreams failed"))
        return Reply(packed.rcode, self.name, entry.outcome, "cache:stale", packed=packed)

    def ttl_for(self, packed: Packed) -> int | None:
        """How long to keep a reply (its TTLs already bounded); None when it must not be cached."""
        if packed.rcode == SERVFAIL:
            return self.servfail_ttl  # RFC 9520 §3.2, RFC 2308 §7.1
        if packed.rcode == NOERROR and packed.ancount:
            ttl = packed.min_ttl
            if ttl is None:
                return None
            return max(self.min_ttl, min(ttl, self.max_ttl))
        if packed.rcode in (NOERROR, NXDOMAIN):
            negative = packed.negative_ttl()
            if negative is None:
                return None  # RFC 2308 §5: no SOA, no negative caching
            return min(negative, self.max_negative_ttl)
        return None

    def _bounded(self, query: Query, reply: Reply) -> Reply:
        """``reply`` in bytes with its TTLs as the cache serves them from now on (the
        one TTL rule: [min_ttl, max_ttl], the overlay's bound above all, a negative
        answer's SOA TTL at the entry's lifetime), so the client whose miss filled the
        cache sees what later hits show and TTLs never rise from one reply to the next."""
        if not reply.cacheable:
            return reply
        return ttl_rule(query, reply, self.min_ttl, self.max_ttl, self.max_negative_ttl)

    def forget_overlay(self, why: str) -> int:
        """Drop every entry whose name the overlay owns (the horizon moved); how many."""
        doomed = [key for key, entry in self.entries.items() if entry.overlay]
        for key in doomed:
            del self.entries[key]
        return len(doomed)

    def _tick(self, moment: float) -> int:
        return min(int((moment - self.epoch) * _TICKS), 2**32 - 1)

    def lifetime(self, entry: Entry) -> tuple[float, float]:
        """When ``entry`` was stored and when it expires, on the cache's clock."""
        stored, expires = _TIMES.unpack_from(entry.blob)
        return self.epoch + (stored + _EARLY) / _TICKS, self.epoch + expires / _TICKS

    def adopt(self, previous: CacheStage) -> int:
        """Take over ``previous``'s entries (a reload that left the cache as it was)."""
        self.entries, self.epoch, self._shapes = previous.entries, previous.epoch, previous._shapes
        return len(self.entries)

    def _shape(self, packed: Packed, outcome: Outcome, overlay: int | None) -> Shape:
        """``packed`` without its body, the outcome and the overlay mark: one object
        for all entries alike."""
        shape = (packed.with_body(b""), outcome, overlay)
        shared = self._shapes.get(shape)
        if shared is None:
            # Forgetting is safe: entries keep their own; only the sharing restarts.
            shared = remember(self._shapes, shape, shape, _SHAPES_MAX)
        return shared

    def store_final(self, query: Query, reply: Reply) -> None:
        """Keep the zone's final reply to ``query`` (called by the zone when leading)."""
        self.store(query_key(query), query, reply)

    def store(self, key: bytes, query: Query, reply: Reply) -> None:
        """Keep ``reply`` under ``key`` with its TTLs rewritten once (see _bounded)."""
        if not reply.cacheable:
            return
        packed = self._bounded(query, reply).packed
        assert packed is not None  # ttl_rule returns bytes
        ttl = self.ttl_for(packed)
        if ttl is None or ttl <= 0:
            return
        now = self.clock()
        entries = self.entries
        if packed.rcode == SERVFAIL:
            # A failure must not push out an answer that serve-stale could still use.
            old = entries.get(key)
            if (
                old is not None
                and old.outcome is not Outcome.FAILED
                and self.serve_stale
                and now <= self.lifetime(old)[1] + self.max_stale
            ):
                return
        entries.pop(key, None)  # re-inserted at the end: the most recently stored
        stored = min(max(0, int((now - self.epoch) * _TICKS + 1e-6) - _EARLY), 2**32 - 1)
        times = _TIMES.pack(stored, self._tick(now + ttl))
        shape = self._shape(packed, reply.outcome, reply.overlay_ttl)
        entries[key] = Entry(shape, times + packed.body)
        if len(entries) > self.max_entries:
            self._evict(key)

    def _evict(self, newest: bytes | None) -> None:
        """Sweep from the oldest entry: used ones go to the end unmarked, unused ones go.

        The entry just stored (``newest``) counts as used. Down to 1/64 below the
        limit at once: finding the oldest entry of a dict skips every slot freed
        before it, a cost paid once per sweep this way rather than per eviction.
        """
        entries = self.entries
        target = self.max_entries - self.max_entries // 64
        while len(entries) > target:
            for key in list(itertools.islice(entries, len(entries) - target)):
                entry = entries.pop(key)
                if entry.used or key == newest:
                    entry.used = False
                    if key == newest:
                        newest = None
                    entries[key] = entry  # a second chance
                else:
                    self.evictions += 1


def build(section: Section, ctx: BuildContext) -> CacheStage | None:
    errors_before = section.where.error_count()
    seconds = int_range(0, 7 * 86400)
    stage = CacheStage(
        name="cache" if ctx.index == 0 else f"cache#{ctx.index}",
        max_entries=section.get("max_entries", int_range(1, 10_000_000), default=10000),
        min_ttl=section.get("min_ttl", seconds, default=0),
        max_ttl=section.get("max_ttl", seconds, default=86400),
        max_negative_ttl=section.get("max_negative_ttl", seconds, default=3600),
        serve_stale=section.get("serve_stale", as_bool, default=True),
        max_stale=section.get("max_stale", seconds, default=86400),
        # RFC 9520 §3.2: at least 1 s; RFC 2308 §7.1: at most 5 minutes.
        servfail_ttl=section.get("servfail_ttl", int_range(0, 300), default=1),
    )
    section.finish()
    if stage.min_ttl > stage.max_ttl:
        section.where.error(section.node, f"min_ttl {stage.min_ttl} is above max_ttl {stage.max_ttl}")
    if section.where.error_count() != errors_before:
        return None
    return stage
