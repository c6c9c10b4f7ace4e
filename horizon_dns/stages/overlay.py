"""The ``overlay`` stage: ``host.mydomain.tld`` answered by asking the overlay for ``host``.

YAML::

    - overlay:
        name: lan
        host: '^(?P<host>[^.]+)\\.mydomain\\.tld\\.$'   # default: the one label left of the zone
        methods: [mdns, llmnr, peers]   # default: mdns and llmnr, plus peers when any are given
        interfaces: [zt0]               # multicast on these (default: every up, multicast one)
        peers: [100.64.0.2]             # unicast peers, for overlays without multicast
        peers_file: /etc/horizon-dns/peers      # one address a line, or JSON
        peers_command: tailscale status --json  # run every peers_refresh seconds
        peers_refresh: 60
        prefer: [100.64.0.0/10, "fd7a:115c:a1e0::/48"]   # these addresses first
        timeout: 0.3                    # seconds for a lookup, all methods at once
        ttl: 30                         # of answers (held to the switch bound below)
        negative_ttl: 30                # a host not found is not asked again for this long (likewise)
        switch_within: 10               # seconds: the horizon follows a host leaving or returning
        on_miss: nxdomain               # or next: a host nobody knows goes to the next stage
        max_lookups: 256                # distinct lookups in flight; beyond, SERVFAIL (final)
        multicast_rate: 50              # multicast queries per second at most (burst: multicast_burst)
        multicast_burst: 100

Contract: for A and AAAA of a name whose host label it can derive, the stage
asks every method concurrently for both IP versions and answers with the first
method's addresses of the asked version -- never link-local ones, which a client
elsewhere cannot use, and those inside ``prefer`` first. A host found only with
the other version gets NODATA (NOERROR + SOA), never NXDOMAIN (mixed answers
break musl). A host nobody knows gets NXDOMAIN, so a zone ``fallback`` can ask
public DNS instead. Results are cached per host and version (positive ``ttl``,
negative ``negative_ttl``) and identical lookups in flight are shared. Names it
cannot derive a host from, other classes and other types pass to the next stage
(other types on a known host end in NODATA).

The switch bound: every reply for a name this stage owns -- found, not found, and
whatever the zone's fallback answers in its place -- carries ``overlay_ttl`` =
``hold`` = ``switch_within`` - ceil(``timeout``) - 1 seconds (8 by default), and what
the stage remembers lives no longer, counting down (its records carry the time
left, never a fresh TTL). No layer keeps such a reply longer, no client is told a
longer TTL, nothing serves it stale; so a host that leaves silently or comes back is
noticed at the next lookup, at most ``hold`` + ``timeout`` after the change.
:meth:`OverlayStage.forget` drops the stage's memory at once when the horizon is
known to have moved (this node's link or address changed, an mDNS goodbye).

A local limit -- ``max_lookups`` lookups in flight, or the multicast budget spent --
is not a finding about the host: the reply is a final SERVFAIL with an Extended DNS
Error, which no zone fallback overrides (an inside name must not get the public
answer because this node was busy).
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

from horizon_dns.config.source import Section, as_str, int_range, item_node, number_range
from horizon_dns.core import clock as clocks
from horizon_dns.core.edns import EDE_OTHER
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.pattern import (
    RUNAWAY_HINT,
    Pattern,
    PatternError,
    PatternTimeout,
    compile_pattern,
    runaway_on,
    search,
)
from horizon_dns.core.stage import Next
from horizon_dns.core.stats import SHED_HELP, Sample, counter
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.errors import LocalLimit
from horizon_dns.llmnr.responder import Interface
from horizon_dns.net.oneshot import MulticastBudget
from horizon_dns.net.overlay import IPAddress, LlmnrLookup, Lookup, MdnsLookup, PeerLookup, first_found
from horizon_dns.stages.context import BuildContext

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


# Building from configuration ---------------------------------------------------

METHODS = ("mdns", "llmnr", "peers")


def build(section: Section, ctx: BuildContext) -> OverlayStage | None:
    from horizon_dns.net.interfaces import list_interfaces

    errors_before = section.where.error_count()
    name = "overlay:" + section.get("name", as_str, default=ctx.zone.rstrip(".") or "root")
    host_text = section.get("host", as_str, default="")
    host_pattern = None
    if host_text:
        try:
            host_pattern = compile_pattern(host_text)
            if "host" not in host_pattern.groupindex:
                section.where.child("host").error(
                    section.node_of("host"), "the regex needs a named group (?P<host>...)"
                )
            elif (runaway := runaway_on(host_pattern)) is not None:
                section.where.child("host").error(
                    section.node_of("host"), f"the regex {runaway}", RUNAWAY_HINT
                )
        except PatternError as exc:
            section.where.child("host").error(section.node_of("host"), f"invalid regex: {exc}")
    interfaces = tuple(section.string_list("interfaces", default=[]))
    peers = section.string_list("peers", default=[])
    for i, peer in enumerate(peers):
        try:
            ipaddress.ip_address(peer)
        except ValueError:
            section.where.child("peers").child(i).error(
                item_node(section.node_of("peers"), i), f"{peer!r} is not an IP address"
            )
    peers_file = section.get("peers_file", as_str, default="")
    peers_command = section.get("peers_command", as_str, default="")
    refresh = section.get("peers_refresh", number_range(1, 86400), default=60.0)
    has_peers = bool(peers or peers_file or peers_command)
    default_methods = ["mdns", "llmnr"] + (["peers"] if has_peers else [])
    methods = section.string_list("methods", default=default_methods)
    for i, method in enumerate(methods):
        if method not in METHODS:
            section.where.child("methods").child(i).error(
                item_node(section.node_of("methods"), i),
                f"unknown method {method!r}",
                "use mdns, llmnr, peers",
            )
    if "peers" in methods and not has_peers:
        section.where.child("methods").error(
            section.node_of("methods"), "method 'peers' needs peers, peers_file or peers_command"
        )
    prefer: list[Network] = []
    for i, text in enumerate(section.string_list("prefer", default=[])):
        try:
            prefer.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            section.where.child("prefer").child(i).error(
                item_node(section.node_of("prefer"), i), f"{text!r} is not a network such as 100.64.0.0/10"
            )
    timeout = section.get("timeout", number_range(0.01, 10), default=0.3)
    ttl = section.get("ttl", int_range(0, 86400), default=30)
    negative_ttl = section.get("negative_ttl", int_range(0, 86400), default=30)
    on_miss = section.get("on_miss", as_str, default="nxdomain")
    max_lookups = section.get("max_lookups", int_range(1, 100_000), default=256)
    switch_within = section.get("switch_within", number_range(3, 86400), default=10.0)
    multicast_rate = section.get("multicast_rate", number_range(1, 10_000), default=50.0)
    multicast_burst = section.get("multicast_burst", int_range(1, 100_000), default=100)
    if on_miss not in ("nxdomain", "next"):
        section.where.child("on_miss").error(
            section.node_of("on_miss"), f"unknown {on_miss!r}", "use nxdomain or next"
        )
    section.finish()
    if section.where.error_count() != errors_before:
        return None

    def listed() -> list[Any]:
        return on_the_overlay(list_interfaces(interfaces))

    if int(switch_within) - math.ceil(timeout) - 1 < 1:
        section.where.child("switch_within").error(
            section.node_of("switch_within"),
            f"switch_within {switch_within:g} s leaves no time to hold an answer with timeout {timeout:g} s",
            f"use at least {math.ceil(timeout) + 2} seconds",
        )
        return None

    lookups: dict[str, Lookup] = {}
    services: list[Any] = []
    # One budget for both multicast methods of this stage: a flood of unknown names
    # costs at most multicast_rate queries a second on the overlay.
    budget = MulticastBudget(multicast_rate, multicast_burst)
    for method in methods:
        if method == "mdns":
            lookups["mdns"] = MdnsLookup(listed, budget)
        elif method == "llmnr":
            lookups["llmnr"] = LlmnrLookup(listed, budget)
        elif method == "peers":
            peer_lookup = PeerLookup(peers, peers_file, peers_command, refresh)
            lookups["peers"], services = peer_lookup, [*services, peer_lookup]
    return OverlayStage(
        name, ctx.zone, lookups, host_pattern, prefer, timeout, ttl, negative_ttl, ctx.soa,
        services=services, on_miss=on_miss, max_lookups=max_lookups, switch_within=switch_within,
        budget=budget, interface_names=interfaces,
    )  # fmt: skip
