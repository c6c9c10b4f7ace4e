"""Zones and their stage chains, and CNAME chasing across them. No sockets.

Contract:

* a query belongs to the zone with the longest matching suffix, compared
  case-insensitively (RFC 4343); the zone ``.`` matches every name;
* a name in no zone is REFUSED (we are not a resolver for it);
* a zone's stages run in order, each deciding to answer or to call ``next``; the
  end of the chain answers NODATA when a stage vouched that the name exists
  (``Query.name_exists``), SERVFAIL otherwise;
* a zone with ``fallback`` hands the *original* query to another zone's chain
  when its own chain ends in one of the fallback rcodes (CoreDNS's ``alternate``,
  as plain configuration rather than a build-time plugin order);
* when an answer ends in a CNAME and the question was not for CNAME or ANY, the
  target is resolved through the pipeline again and its records appended, so a
  stub gets the whole chain in one reply (RFC 1034 §4.3.2 step 3a); chasing is
  bounded in depth and stops with SERVFAIL on a loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dnslib import QTYPE, RR

from horizon_dns.core.edns import EDE_NOT_AUTHORITATIVE, EDE_NOT_SUPPORTED, EDE_OTHER, EDE_PROHIBITED
from horizon_dns.core.encode import as_records
from horizon_dns.core.loop import LoopGuard
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.names import name_to_text, text_to_name
from horizon_dns.core.packed import TYPE_SOA
from horizon_dns.core.stage import HotCache, Next, Stage
from horizon_dns.core.stats import Histogram
from horizon_dns.core.ttl import ttl_rule
from horizon_dns.core.wire import CLASS_IN, NOERROR, NXDOMAIN, REFUSED, SERVFAIL, rcode_name

MAX_CNAME_DEPTH = 8
TYPE_CNAME = 5  # RFC 1035 §3.2.2; a plain int: dnslib's QTYPE.CNAME is a slow lookup per use
_NO_CHASE = frozenset({TYPE_CNAME, QTYPE.ANY})
_ZONE_TRANSFERS = frozenset({251, 252})  # IXFR, AXFR: our zones are synthesized, nothing to transfer


@dataclass(slots=True)
class Zone:
    """A zone apex, its stages in order, and the SOA used for negative answers."""

    name: str
    stages: Sequence[Stage]
    soa: RR | None = None
    fallback_rcodes: frozenset[int] = frozenset()
    fallback_zone: Zone | None = None
    #: The zone's configuration as text: equal fingerprints mean the same answers.
    fingerprint: str = ""
    chain: Next = field(init=False)
    #: RA=1 in replies: some stage of this zone may ask other servers (the Pipeline
    #: then sets it on every zone).
    recursion_available: bool = field(init=False)
    #: Stage name -> time spent in it and the stages after it (seconds).
    timings: dict[str, Histogram] = field(init=False)
    #: A cache first in the zone holds *final* replies (after CNAME chasing and
    #: fallback), so the hot path can serve them as they are.
    leading_cache: HotCache | None = field(init=False)

    def __post_init__(self) -> None:
        self.timings = {stage.name: Histogram() for stage in self.stages}
        self.chain = _build_chain(self, list(self.stages))
        self.recursion_available = any(stage.recurses for stage in self.stages)
        first = self.stages[0] if self.stages else None
        self.leading_cache = first if isinstance(first, HotCache) else None
        if self.leading_cache is not None:
            self.leading_cache.leading = True

    def is_final(self, reply: Reply) -> bool:
        """A reply the leading cache gave: already chased and fallen back."""
        return self.leading_cache is not None and reply.stage == self.leading_cache.name

    async def resolve(self, query: Query) -> Reply:
        """Run the chain; on a fallback rcode, run the fallback zone's chain instead."""
        fallback = self.fallback_zone
        if fallback is None:
            return await self.chain(query)
        original = replace(query, name_exists=None)
        reply = await self.chain(query)
        if reply.rcode not in self.fallback_rcodes or self.is_final(reply):
            return reply
        rcode = rcode_name(reply.rcode)
        if reply.final:
            # DECISIONS.md 1: our own limit said no; the public answer would pick the
            # wrong horizon for an inside name.
            query.note(f"{reply.stage} said {rcode} for a local limit: final, no fallback")
            return reply
        query.note(f"fallback: {reply.stage} said {rcode} -> zone {fallback.name}")
        answer = await fallback.chain(original)
        # The overlay owns the name (it said "not found"): the public answer lasts only
        # as long as that finding, so the overlay is asked again within its bound.
        overlay_ttl = _tighter(answer.overlay_ttl, reply.overlay_ttl)
        return replace(answer, reason=f"fallback:{reply.stage} {rcode}", overlay_ttl=overlay_ttl)

    def negative_authority(self) -> list[RR]:
        """The SOA to put in a NODATA/NXDOMAIN authority section (RFC 2308 §3)."""
        return [self.soa] if self.soa is not None else []


def _build_chain(zone: Zone, stages: list[Stage]) -> Next:
    apex = text_to_name(_normalise_zone(zone.name))

    async def end_of_chain(query: Query) -> Reply:
        if (
            query.qtype == TYPE_SOA
            and query.qclass == CLASS_IN
            and zone.soa is not None
            and query.qname_wire.lower() == apex
        ):
            # The zone's own SOA at its apex (RFC 1034 §4.3.2): the record its negative
            # answers already carry, asked for by name.
            query.note("end of chain: the zone's SOA at its apex")
            soa = [zone.soa]
            return Reply(NOERROR, "pipeline", Outcome.ANSWER, "apex-soa", answer=soa, authoritative=True)
        if query.name_exists is not None:
            query.note(f"end of chain: NODATA ({query.name_exists} vouched the name exists)")
            return Reply(
                NOERROR,
                "pipeline",
                Outcome.NODATA,
                f"nodata:{query.name_exists}",
                authority=zone.negative_authority(),
                authoritative=zone.soa is not None,
            )
        if query.qclass != CLASS_IN:
            query.note(f"end of chain: class {query.class_name} is not served here -> REFUSED")
            return Reply(
                REFUSED,
                "pipeline",
                Outcome.REFUSED,
                "class",
                ede=(EDE_NOT_SUPPORTED, "only class IN is served"),
            )
        query.note("end of chain: no stage answered -> SERVFAIL")
        return Reply(
            SERVFAIL,
            "pipeline",
            Outcome.FAILED,
            "end-of-chain",
            ede=(EDE_OTHER, f"no stage of zone {zone.name} answered"),
        )

    chain: Next = end_of_chain
    for stage in reversed(stages):
        chain = _link(stage, chain, zone.timings[stage.name])
    return chain


def _link(stage: Stage, next_: Next, timing: Histogram) -> Next:
    clock = time.perf_counter

    async def call(query: Query) -> Reply:
        if query.trace is not None:
            query.note(f"stage {stage.name}")
        started = clock()
        try:
            return await stage.handle(query, next_)
        finally:
            timing.observe(clock() - started)

    return call


def _normalise_zone(name: str) -> str:
    name = name.lower()
    if name in ("", "."):
        return "."
    return name if name.endswith(".") else name + "."


class Pipeline:
    """All zones of a configuration; resolves a Query to a Reply."""

    def __init__(
        self,
        zones: Sequence[Zone],
        max_cname_depth: int = MAX_CNAME_DEPTH,
        guard: LoopGuard | None = None,
    ) -> None:
        self.zones = {_normalise_zone(z.name): z for z in zones}
        # RA says whether the *server* offers recursion (RFC 1035 §4.1.1), not a zone:
        # with a forwarder anywhere, every zone's replies carry it -- dig and stub
        # resolvers warn "recursion requested but not available" otherwise.
        if any(z.recursion_available for z in zones):
            for zone in zones:
                zone.recursion_available = True
        self.max_cname_depth = max_cname_depth
        self.guard = guard or LoopGuard()
        # Lowercased wire apex -> (zone, its leading cache stage or None), for the hot path.
        self.by_wire: dict[bytes, tuple[Zone, HotCache | None]] = {}
        for name, zone in self.zones.items():
            self.by_wire[text_to_name(name)] = (zone, zone.leading_cache)
        #: Some zone starts with a cache: only then can the hot path answer anything.
        self.has_hot_path = any(cache is not None for _zone, cache in self.by_wire.values())

    def zone_for_wire(self, lower_wire: bytes) -> tuple[Zone, HotCache | None] | None:
        """The zone of a lowercased wire name, by longest suffix; no text conversion."""
        by_wire = self.by_wire
        offset = 0
        while True:
            found = by_wire.get(lower_wire[offset:] if offset else lower_wire)
            if found is not None:
                return found
            length = lower_wire[offset]
            if length == 0:
                return None
            offset += 1 + length

    @property
    def stages(self) -> list[Stage]:
        return [stage for zone in self.zones.values() for stage in zone.stages]

    async def start(self) -> None:
        for stage in self.stages:
            await stage.start()

    async def stop(self) -> None:
        for stage in reversed(self.stages):
            await stage.stop()

    async def resolve(self, query: Query) -> tuple[Reply, Zone | None]:
        """Answer ``query``; the zone (if any) tells the edge whether RA is set."""
        if query.qtype in _ZONE_TRANSFERS:
            query.note("zone transfers are not offered -> REFUSED")
            return Reply(
                REFUSED, "pipeline", Outcome.REFUSED, "transfer", ede=(EDE_PROHIBITED, "no zone transfers")
            ), None
        found = self.zone_for_wire(query.qname_wire.lower())
        zone = found[0] if found is not None else None
        if zone is None:
            query.note(f"{query.name} is in no zone -> REFUSED")
            return (
                Reply(
                    REFUSED,
                    "pipeline",
                    Outcome.REFUSED,
                    "no-zone",
                    ede=(EDE_NOT_AUTHORITATIVE, "name is in no zone of this server"),
                ),
                None,
            )
        query.note(f"zone {zone.name}")
        return await self._resolve_in(zone, query, chase=True), zone

    async def _resolve_in(self, zone: Zone, query: Query, chase: bool) -> Reply:
        """The zone's reply, CNAME-chased when asked, and stored by a leading cache."""
        reply = await zone.resolve(query)
        if zone.is_final(reply):
            return reply
        if chase and reply.rcode == NOERROR and query.qtype not in _NO_CHASE:
            reply = await self._chase(query, reply)
        if reply.overlay_ttl is not None:
            # The overlay's bound holds in every layer after this one (caches, clients).
            reply = ttl_rule(query, reply)
        if zone.leading_cache is not None:
            zone.leading_cache.store_final(query, reply)
        return reply

    async def _chase(self, query: Query, reply: Reply) -> Reply:
        qtype = query.qtype
        if reply.packed is not None and not reply.packed.answers_with_cname():
            return reply  # nothing to chase: no need to decode the bytes
        # The records, decoded from bytes when the reply holds bytes, to follow the chain.
        records = as_records(query, reply)
        answer, authority, additional = records.answer, records.authority, records.additional
        if not answer or not any(rr.rtype == TYPE_CNAME for rr in answer):
            return reply
        original_count = len(answer)
        answer = list(answer)
        # Names compared as lowercased wire bytes: text forms differ between libraries
        # for labels holding dots, quotes or high bytes (RFC 2181 §11).
        current = query.qname_wire.lower()
        seen = {current}
        rcode = reply.rcode
        cacheable = reply.cacheable
        overlay_ttl = reply.overlay_ttl
        while True:
            target_wire = _cname_target(answer, current)
            if target_wire is None or _has_rrset(answer, target_wire, qtype):
                break
            target = name_to_text(target_wire)
            if target_wire in seen or len(seen) > self.max_cname_depth:
                why = "CNAME loop" if target_wire in seen else "CNAME chain too long"
                query.note(f"{why} at {target} -> SERVFAIL")
                return Reply(
                    SERVFAIL,
                    reply.stage,
                    Outcome.FAILED,
                    "cname-loop" if target_wire in seen else "cname-too-long",
                    ede=(EDE_OTHER, f"{why} at {target}"),
                )
            seen.add(target_wire)
            found = self.zone_for_wire(target_wire)
            zone = found[0] if found is not None else None
            if zone is None:
                # Not ours: hand the stub the chain so far, as an authority would.
                query.note(f"CNAME target {target} is in no zone: returned as is")
                break
            query.note(f"chase CNAME -> {target}")
            sub = query.derive(target_wire)
            sub_reply = await self._resolve_in(zone, sub, chase=False)
            sub_records = as_records(sub, sub_reply)
            answer.extend(sub_records.answer)
            rcode, authority = sub_reply.rcode, sub_records.authority
            cacheable = cacheable and sub_reply.cacheable
            overlay_ttl = _tighter(overlay_ttl, sub_reply.overlay_ttl)
            if rcode != NOERROR:
                break
            if sub_reply.packed is not None and sub_reply.packed.final:
                break  # a recursive upstream followed the rest of the chain already
            current = target_wire
        if len(answer) == original_count and rcode == reply.rcode and overlay_ttl == reply.overlay_ttl:
            return reply
        outcome = Outcome.ANSWER if rcode == NOERROR else _outcome_for(rcode)
        return Reply(
            rcode,
            reply.stage,
            outcome,
            reply.reason,
            answer=answer,
            authority=authority,
            additional=additional,
            authoritative=records.authoritative,
            cacheable=cacheable,
            overlay_ttl=overlay_ttl,
        )


def _tighter(a: int | None, b: int | None) -> int | None:
    """The shorter of two overlay bounds; None when neither part is the overlay's."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def _wire(label: Any) -> bytes:
    """A dnslib DNSLabel as lowercased wire bytes."""
    return b"".join(bytes([len(part)]) + part for part in label.label).lower() + b"\x00"


def _cname_target(answer: list[RR], owner: bytes) -> bytes | None:
    for rr in answer:
        if rr.rtype == TYPE_CNAME and _wire(rr.rname) == owner:
            return _wire(rr.rdata.label)
    return None


def _has_rrset(answer: list[RR], owner: bytes, qtype: int) -> bool:
    return any(rr.rtype == qtype and _wire(rr.rname) == owner for rr in answer)


def _outcome_for(rcode: int) -> Outcome:
    if rcode == NXDOMAIN:
        return Outcome.NXDOMAIN
    if rcode == REFUSED:
        return Outcome.REFUSED
    if rcode == SERVFAIL:
        return Outcome.FAILED
    return Outcome.OTHER
