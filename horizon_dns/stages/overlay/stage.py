"""The overlay stage at query time: derive the host, ask the overlay, answer within the bound.

Contract: :class:`OverlayStage` as :mod:`horizon_dns.stages.overlay` documents it
(the YAML, the switch bound, local limits); ``switch_hold`` is that bound's hold
time and ``usable`` the address filter every answer passes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dnslib import AAAA, QTYPE, RR, A

from horizon_dns.core import clock as clocks
from horizon_dns.core.edns import EDE_OTHER
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.pattern import (
    Pattern,
    PatternTimeout,
    search,
)
from horizon_dns.core.stage import Next
from horizon_dns.core.stats import SHED_HELP, Sample, counter
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.errors import LocalLimit
from horizon_dns.llmnr.responder import Interface
from horizon_dns.net.oneshot import MulticastBudget
from horizon_dns.net.overlay import IPAddress, Lookup, first_found

log = logging.getLogger("horizon_dns.stages.overlay")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Seconds a miss is kept when no method could ask anyone.
UNASKED_TTL = 1

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


@dataclass(slots=True)
class _Known:
    addresses: list[IPAddress]
    method: str
    expires: float


@dataclass(slots=True)
class Horizon:
    """Where a host stands as seen from here: inside (the overlay answers for it) or
    outside, since when (on the stage's clock) and why."""

    inside: bool
    since: float
    why: str


def switch_hold(switch_within: float, timeout: float) -> int:
    """How long an overlay-derived answer may be kept so that a change is noticed
    within ``switch_within``: the bound less one lookup timeout and a second of
    slack (whole seconds, TTLs are integers); at least 1."""
    return max(1, int(switch_within) - math.ceil(timeout) - 1)


def usable(addresses: Sequence[IPAddress], prefer: Sequence[Network]) -> list[IPAddress]:
    """Drop link-local and unspecified addresses; put those inside ``prefer`` first."""
    kept = [a for a in addresses if not a.is_link_local and not a.is_unspecified and not a.is_multicast]
    seen: list[IPAddress] = []
    for address in kept:
        if address not in seen:
            seen.append(address)
    return sorted(seen, key=lambda a: not any(a.version == n.version and a in n for n in prefer))


class OverlayStage:
    """Resolves hosts of the overlay through mDNS, LLMNR and known peers."""

    recurses = False
    network = True  # `explain --offline` leaves it out

    def __init__(
        self,
        name: str,
        zone: str,
        methods: dict[str, Lookup],
        host_pattern: Pattern | None = None,
        prefer: Sequence[Network] = (),
        timeout: float = 0.3,
        ttl: int = 30,
        negative_ttl: int = 30,
        soa: RR | None = None,
        clock: Callable[[], float] = clocks.now,
        services: Sequence[Any] = (),
        on_miss: str = "nxdomain",
        max_lookups: int = 256,
        switch_within: float = 10.0,
        budget: MulticastBudget | None = None,
        interface_names: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.zone = zone
        self.methods = methods
        self.host_pattern = host_pattern
        self.prefer = list(prefer)
        self.timeout = timeout
        self.switch_within = switch_within
        #: The longest any layer keeps or hands out an answer of this stage.
        self.hold = switch_hold(switch_within, timeout)
        self.ttl = min(ttl, self.hold)
        self.negative_ttl = min(negative_ttl, self.hold)
        self.budget = budget
        #: The interfaces configured for multicast; empty: every up multicast one.
        self.interface_names = tuple(interface_names)
        self.soa = soa
        self.clock = clock
        self.services = list(services)  # objects with start()/stop(): the peer list's refresh
        self.on_miss = on_miss
        self.max_lookups = max_lookups
        self.shed = 0
        self.known: dict[tuple[str, int], _Known] = {}
        self.inflight: dict[tuple[str, int], asyncio.Future[_Known]] = {}
        self.lookups: dict[tuple[str, str], int] = {}  # (method, found|missed) -> count
        #: Host -> where it stands; changes counted in ``switches`` (to inside, to outside).
        self.horizon: dict[str, Horizon] = {}
        self.switches = {"inside": 0, "outside": 0}
        #: Replies by result: answer, nodata, not-found, local-limit.
        self.replies = {"answer": 0, "nodata": 0, "not-found": 0, "local-limit": 0}
        self.forgotten = 0

    async def start(self) -> None:
        for service in self.services:
            await service.start()

    async def stop(self) -> None:
        for future in self.inflight.values():
            future.cancel()
        for service in reversed(self.services):
            await service.stop()

    def host_of(self, name: str) -> str | None:
        """The host label a query name stands for, or None."""
        if self.host_pattern is not None:
            try:
                found = search(self.host_pattern, name)
            except PatternTimeout as exc:
                log.warning("%s: %s on %s", self.name, exc, name)
                return None
            host = found.group("host") if found else None
        else:
            suffix = "." + self.zone if self.zone != "." else ""
            if not name.endswith(suffix) or name == self.zone:
                return None
            host = name[: len(name) - len(suffix)].rstrip(".")
        if host is None or not _LABEL.match(host):
            return None
        return host

    async def handle(self, query: Query, next: Next) -> Reply:
        host = self.host_of(query.name) if query.qclass == 1 else None
        if host is None:
            query.note("  no host label in this name -> next")
            return await next(query)
        if query.qtype not in (QTYPE.A, QTYPE.AAAA, QTYPE.ANY):
            # Other types never start a lookup (an NS or DS query for a TLD must not wait
            # for mDNS); a host already known makes the end of the chain say NODATA.
            if self._known_now(host):
                query.name_exists = query.name_exists or self.name
            return await next(query)
        try:
            reply = await self._resolve(query, host)
        except LocalLimit as exc:
            self.replies["local-limit"] += 1
            query.note(f"  {exc}: SERVFAIL, final (no fallback: the public answer is not ours to give)")
            return Reply(
                SERVFAIL, self.name, Outcome.FAILED, f"{self.name}:local-limit",
                ede=(EDE_OTHER, f"{self.name}: {exc}"), cacheable=False, final=True,
            )  # fmt: skip
        if reply is None:
            query.note(f"  {host} not found by {', '.join(self.methods)} -> next")
            reply = await next(query)
            # Whatever answers instead lasts no longer than the "not found" it stands on.
            bound = self.hold if reply.overlay_ttl is None else min(self.hold, reply.overlay_ttl)
            return replace(reply, overlay_ttl=bound)
        return reply

    async def _resolve(self, query: Query, host: str) -> Reply | None:
        """The stage's own reply for ``host``, or None to ask the next stage (on_miss: next)."""
        version = 6 if query.qtype == QTYPE.AAAA else 4
        # Both versions at once: the other one decides NODATA vs NXDOMAIN at no extra wait.
        other = self._lookup(host, 10 - version, query)
        known = await self._lookup(host, version, query)
        self._explain(query, host)
        if known.addresses:
            records = self._records(query, known)
            if query.qtype == QTYPE.ANY:
                records += self._records(query, await other)
            self.replies["answer"] += 1
            return Reply(
                NOERROR, self.name, Outcome.ANSWER, f"{self.name}:{known.method}",
                answer=records, authoritative=True, overlay_ttl=self.hold,
            )  # fmt: skip
        other_known = await other
        authority = [self.soa] if self.soa is not None else []
        if other_known.addresses:
            query.note(f"  {host} has only IPv{10 - version} addresses -> NODATA")
            self.replies["nodata"] += 1
            return Reply(
                NOERROR, self.name, Outcome.NODATA, f"{self.name}:{other_known.method}",
                authority=authority, authoritative=True, overlay_ttl=self.hold,
            )  # fmt: skip
        self.replies["not-found"] += 1
        if self.on_miss == "next":
            return None
        query.note(f"  {host} not found by {', '.join(self.methods)} -> NXDOMAIN")
        return Reply(
            NXDOMAIN, self.name, Outcome.NXDOMAIN, f"{self.name}:not-found",
            authority=authority, authoritative=True, overlay_ttl=self.hold,
        )  # fmt: skip

    def _explain(self, query: Query, host: str) -> None:
        """For ``explain``: where the host stands and what would move it."""
        if query.trace is None:
            return
        state = self.horizon.get(host)
        if state is None:
            return
        ago = self.clock() - state.since
        side = "inside (the overlay answers)" if state.inside else "outside (the overlay does not answer)"
        query.note(f"  horizon: {host} is {side} since {ago:.1f} s ago: {state.why}")
        if state.inside:
            moves = f"{host} stops answering (noticed within {self.switch_within:g} s)"
        else:
            moves = f"{host} answers again (noticed within {self.switch_within:g} s)"
        query.note(
            f"  horizon: answers held at most {self.hold} s; switches when {moves}, "
            "on an mDNS goodbye or announcement, or when this node's overlay link or address changes"
        )

    def _records(self, query: Query, known: _Known) -> list[RR]:
        # The time the finding has left, never a fresh TTL: layers after this one count
        # down from here, so the whole stack forgets it when this stage does.
        ttl = max(0, min(self.ttl, int(known.expires - self.clock())))
        out = []
        for address in known.addresses:
            rdata = A(str(address)) if address.version == 4 else AAAA(str(address))
            rtype = QTYPE.A if address.version == 4 else QTYPE.AAAA
            out.append(RR(query.name, rtype, ttl=ttl, rdata=rdata))
        return out

    def _known_now(self, host: str) -> bool:
        now = self.clock()
        return any(
            (known := self.known.get((host, version))) is not None and known.addresses and now < known.expires
            for version in (4, 6)
        )

    def stats(self, zone: str) -> Iterator[Sample]:
        """Lookups by method and result, replies by result, switches, what the caps refused."""
        name = self.name
        for (method, result), n in list(self.lookups.items()):
            yield counter("overlay_lookups", "Overlay lookups.", n, stage=name, method=method, result=result)
        for result, n in self.replies.items():
            yield counter("overlay_replies", "Overlay replies.", n, zone=zone, stage=name, result=result)
        for to, n in self.switches.items():
            yield counter("horizon_switches", "Hosts that changed side.", n, zone=zone, stage=name, to=to)
        limited = self.budget.limited if self.budget is not None else 0
        yield counter("overlay_multicast_limited", "Multicast refused.", limited, zone=zone, stage=name)
        yield counter("stage_shed", SHED_HELP, self.shed, stage=self.name)

    def heard(self, host: str, goodbye: bool) -> bool:
        """Whether an mDNS record about ``host`` contradicts what this stage believes: a
        goodbye (RFC 6762 §10.1) for a host seen inside, an announcement (§8.3) for one
        seen outside. A host never asked about changes nothing: nothing is held for it."""
        state = self.horizon.get(host)
        return state is not None and state.inside == goodbye

    def forget_overlay(self, why: str) -> int:
        """Drop what the stage knows (the horizon moved: ``why``); how many findings."""
        dropped = len(self.known)
        self.known.clear()
        self.forgotten += 1
        for state in self.horizon.values():
            state.why = f"{state.why}; forgotten: {why}"
        return dropped

    def _lookup(self, host: str, version: int, query: Query) -> asyncio.Future[_Known]:
        """The cached result, the lookup in flight, or a new lookup -- as a future.

        Raises LocalLimit at the lookup cap: a flood of distinct unknown names must not
        start lookups without end, and must not be mistaken for "not found"."""
        key = (host, version)
        known = self.known.get(key)
        loop = asyncio.get_running_loop()
        if known is not None and self.clock() < known.expires:
            query.note(f"  IPv{version} of {host}: cached ({known.method or 'not found'})")
            future: asyncio.Future[_Known] = loop.create_future()
            future.set_result(known)
            return future
        running = self.inflight.get(key)
        if running is not None:
            return running
        if len(self.inflight) >= self.max_lookups:
            self.shed += 1
            raise LocalLimit(f"{len(self.inflight)} overlay lookups in flight (max_lookups)")
        task = loop.create_task(self._ask(host, version, query))
        self.inflight[key] = task
        task.add_done_callback(_retrieved)
        task.add_done_callback(lambda _t: self.inflight.pop(key, None))
        return task

    async def _ask(self, host: str, version: int, query: Query) -> _Known:
        started = self.clock()

        async def via(method: str, lookup: Lookup) -> list[IPAddress]:
            try:
                result = await lookup(host, version, self.timeout)
            except LocalLimit:
                limited.append(method)
                return []
            if result is None:
                unasked.append(method)
            found = usable(result or [], self.prefer)
            self.lookups[(method, "found" if found else "missed")] = (
                self.lookups.get((method, "found" if found else "missed"), 0) + 1
            )
            if found:
                winner.append(method)
            return found

        winner: list[str] = []
        unasked: list[str] = []
        limited: list[str] = []
        try:
            found = await asyncio.wait_for(
                first_found([via(m, lookup) for m, lookup in self.methods.items()]), self.timeout + 0.05
            )
        except TimeoutError:
            found = []
        elapsed = (self.clock() - started) * 1000
        if not found and limited:
            # Not a finding about the host: the budget kept us from asking (DECISIONS.md 1).
            self.lookups[(",".join(limited), "rate-limited")] = (
                self.lookups.get((",".join(limited), "rate-limited"), 0) + 1
            )
            raise LocalLimit(f"multicast budget spent ({', '.join(limited)}): {host} not asked")
        method = winner[0] if winner and found else ""
        outcome = f"{[str(a) for a in found]} by {method}" if found else "not found"
        query.note(f"  IPv{version} of {host}: {outcome} in {elapsed:.1f} ms")
        log.debug("%s: IPv%d of %s: %s in %.1f ms", self.name, version, host, outcome, elapsed)
        lifetime = self.ttl if found else self.negative_ttl
        why = f"found by {method}" if found else f"not found by {', '.join(self.methods)}"
        if not found and len(unasked) == len(self.methods):
            # Nobody could be asked (the overlay link is down, no peers): not a finding
            # about the host. Kept a second only, so the link's return is seen at once.
            lifetime = min(lifetime, UNASKED_TTL)
            why = "nobody could be asked (no overlay interface up, no peers)"
            query.note(f"  nobody could be asked for {host} (no interface up, no peers): kept {lifetime} s")
        now = self.clock()
        known = _Known(found, method, now + lifetime)
        self.known[(host, version)] = known
        self._track(host, version, bool(found), why, now)
        return known

    def _track(self, host: str, version: int, found: bool, why: str, now: float) -> None:
        """Update where ``host`` stands after a lookup; count and log a switch."""
        other = self.known.get((host, 10 - version))
        other_fresh = other is not None and now < other.expires
        if not other_fresh and (host, 10 - version) in self.inflight:
            return  # the other version's answer, due any moment, completes the picture
        inside = found or (other is not None and other_fresh and bool(other.addresses))
        state = self.horizon.get(host)
        if state is None:
            if len(self.horizon) >= 4096:  # bounded: random names must not grow it without end
                self.horizon.clear()
            self.horizon[host] = Horizon(inside, now, why)
            return
        if state.inside != inside:
            self.switches["inside" if inside else "outside"] += 1
            log.info(
                "%s: %s is now %s the overlay (%s)", self.name, host, "inside" if inside else "outside", why
            )
            state.inside, state.since = inside, now
        state.why = why


def _retrieved(task: asyncio.Future[_Known]) -> None:
    """Mark a lookup's exception as seen: a waiter that was cancelled never reads it."""
    if not task.cancelled():
        task.exception()


def on_the_overlay(interfaces: list[Interface]) -> list[Interface]:
    """The interfaces this node is on the overlay through: those with an address that is
    not link-local. A node whose overlay address is gone is outside, even though its
    link still carries IPv6 link-local multicast: asking from there would find hosts
    at addresses it cannot reach (and answer NODATA where the public answer belongs)."""
    return [i for i in interfaces if any(not a.ip.is_link_local for a in i.addresses)]
