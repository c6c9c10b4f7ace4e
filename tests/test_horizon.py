"""The horizon follows the network, sans I/O: TTL decay across stacked layers, the switch
bound, no serve-stale for overlay names, local limits that never fall back, and the
sleep-aware clock. The same timeline through real avahi and systemd-resolved is in
test_lab_horizon.py."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import dns.message
import dns.rdatatype
import pytest
from dnslib import RR
from helpers import FakeClock as Clock
from helpers import make_query

from horizon_dns.core import clock as clocks
from horizon_dns.core.encode import TCP_LIMIT, encode_reply
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.pipeline import Pipeline, Zone
from horizon_dns.core.stage import Next
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.errors import LocalLimit
from horizon_dns.horizon import HorizonWatch
from horizon_dns.net.overlay import IPAddress
from horizon_dns.stages.cache import EDE_STALE_ANSWER, CacheStage
from horizon_dns.stages.overlay import OverlayStage, switch_hold

NODEB = "100.64.0.2"
PUBLIC = "192.0.2.1"


class Overlay:
    """A lookup method whose host can leave and come back; counts its calls."""

    def __init__(self) -> None:
        self.present = True
        self.calls = 0
        self.limited = False

    async def __call__(self, host: str, version: int, timeout: float) -> list[IPAddress]:
        self.calls += 1
        if self.limited:
            raise LocalLimit("multicast budget spent")
        if host == "nodeb" and version == 4 and self.present:
            return [ipaddress.ip_address(NODEB)]
        return []


class Public:
    """The public side: a stage answering every name with PUBLIC, TTL 3600 (or failing)."""

    name = "public"
    recurses = True

    def __init__(self) -> None:
        self.failing = False
        self.calls = 0

    async def handle(self, query: Query, next: Next) -> Reply:
        self.calls += 1
        if self.failing:
            return Reply(SERVFAIL, self.name, Outcome.FAILED, "down")
        record = RR.fromZone(f"{query.name} 3600 IN A {PUBLIC}")
        return Reply(NOERROR, self.name, Outcome.ANSWER, "public", answer=record)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def build(clock: Clock) -> tuple[Pipeline, Overlay, Public, OverlayStage, list[CacheStage]]:
    """The shipped shape: zone mydomain.tld [cache, overlay] falling back to "." [cache, public]."""
    method, public = Overlay(), Public()
    overlay = OverlayStage(
        "overlay:t", "mydomain.tld.", {"mdns": method}, clock=clock, ttl=30, negative_ttl=30
    )
    inner = CacheStage(clock=clock)
    outer = CacheStage(name="cache#0", clock=clock)
    root = Zone(".", [outer, public])
    zone = Zone(
        "mydomain.tld", [inner, overlay], fallback_rcodes=frozenset({NXDOMAIN, SERVFAIL}), fallback_zone=root
    )
    return Pipeline([zone, root]), method, public, overlay, [inner, outer]


def ask(pipeline: Pipeline, name: str = "nodeb.mydomain.tld.") -> tuple[Reply, list[tuple[str, int]]]:
    """The reply and its answer as (address, TTL), read back from the wire like a client."""
    query = make_query(name)
    reply, _zone = asyncio.run(pipeline.resolve(query))
    message = dns.message.from_wire(encode_reply(query, reply, TCP_LIMIT, True))
    return reply, [
        (rdata.to_text(), rrset.ttl)
        for rrset in message.answer
        if rrset.rdtype == dns.rdatatype.A
        for rdata in rrset
    ]


def test_the_hold_leaves_room_for_a_lookup_within_the_bound() -> None:
    assert switch_hold(10, 0.3) == 8
    assert switch_hold(10, 2) == 7
    assert switch_hold(3, 0.3) == 1


def test_a_host_that_leaves_is_public_within_the_bound_and_ttls_decay_through_every_layer() -> None:
    clock = Clock()
    pipeline, method, _public, overlay, _caches = build(clock)
    hold = overlay.hold
    _, answer = ask(pipeline)
    assert answer == [(NODEB, hold)]  # 8, not the stage's ttl 30
    clock.now += 3
    _, answer = ask(pipeline)
    assert answer == [(NODEB, hold - 3)]  # the cache counts down...
    calls = method.calls
    _, answer = ask(pipeline, "NODEB.mydomain.tld.")
    assert answer == [(NODEB, hold - 3)] and method.calls == calls  # ...and one lookup serves the window

    method.present = False  # b's link goes down, no goodbye
    clock.now += hold - 3 - 0.1
    _, answer = ask(pipeline)
    assert answer == [(NODEB, 0)]  # the last moment of the old horizon, TTL 0
    clock.now += 0.1
    reply, answer = ask(pipeline)
    # Public now; and the public record's 3600 is held to the bound: the overlay is
    # asked again within it.
    assert answer == [(PUBLIC, hold)] and reply.reason.startswith("fallback:")


def test_a_host_that_comes_back_is_inside_within_the_bound_whatever_the_public_ttl() -> None:
    clock = Clock()
    pipeline, method, _public, overlay, _caches = build(clock)
    method.present = False
    _, answer = ask(pipeline)
    assert answer == [(PUBLIC, overlay.hold)]
    method.present = True  # b is back
    clock.now += overlay.hold - 1
    _, answer = ask(pipeline)
    assert answer == [(PUBLIC, 1)]
    clock.now += 1
    _, answer = ask(pipeline)
    assert answer == [(NODEB, overlay.hold)]


def test_the_stage_memory_hands_on_the_time_left_not_a_fresh_ttl() -> None:
    """A second name for the same host (the stage's own memory, no new lookup) gets the
    TTL that is left, so the zone cache cannot stretch it by another hold."""
    clock = Clock()
    pipeline, method, _public, overlay, _caches = build(clock)
    ask(pipeline)
    clock.now += 5
    calls = method.calls
    query = make_query("nodeb.mydomain.tld.")
    reply = asyncio.run(overlay.handle(query, _nowhere))
    assert method.calls == calls
    assert [rr.ttl for rr in reply.answer] == [overlay.hold - 5]


async def _nowhere(query: Query) -> Reply:
    raise AssertionError("the next stage must not be asked")


def test_an_overlay_name_is_never_served_stale() -> None:
    """Single-label names in zone ".": cache, overlay (on_miss next), public. After the host
    leaves and the public side fails, the old overlay answer is not served stale."""
    clock = Clock()
    method, public = Overlay(), Public()
    overlay = OverlayStage("overlay:single", ".", {"mdns": method}, clock=clock, on_miss="next")
    cache = CacheStage(clock=clock)
    pipeline = Pipeline([Zone(".", [cache, overlay, public])])
    _, answer = ask(pipeline, "nodeb.")
    assert answer == [(NODEB, overlay.hold)]
    method.present, public.failing = False, True
    clock.now += overlay.hold + 1
    reply, answer = ask(pipeline, "nodeb.")
    assert reply.rcode == SERVFAIL and answer == []
    assert reply.ede is None or reply.ede[0] != EDE_STALE_ANSWER
    assert cache.stale_served == 0
    # Public data still gets serve-stale (RFC 8767).
    public.failing = False
    ask(pipeline, "example.org.")
    public.failing = True
    clock.now += 3601
    reply, answer = ask(pipeline, "example.org.")
    ede = reply.ede or (reply.packed.ede if reply.packed is not None else None)
    assert ede is not None and ede[0] == EDE_STALE_ANSWER and answer == [(PUBLIC, 30)]


def test_the_overlay_finding_not_found_is_held_to_the_bound_too() -> None:
    """on_miss next: whatever the next stage answers for an overlay name carries the bound."""
    clock = Clock()
    method, public = Overlay(), Public()
    method.present = False
    overlay = OverlayStage("overlay:single", ".", {"mdns": method}, clock=clock, on_miss="next")
    pipeline = Pipeline([Zone(".", [CacheStage(clock=clock), overlay, public])])
    reply, answer = ask(pipeline, "nodeb.")
    assert answer == [(PUBLIC, overlay.hold)] and reply.overlay_ttl == overlay.hold


@pytest.mark.parametrize("limit", ["max_lookups", "multicast"])
def test_a_local_limit_is_a_final_servfail_never_the_public_answer(limit: str) -> None:
    clock = Clock()
    pipeline, method, public, overlay, _caches = build(clock)
    if limit == "max_lookups":
        overlay.max_lookups = 0
    else:
        method.limited = True
    reply, answer = ask(pipeline)
    assert reply.rcode == SERVFAIL and answer == [] and reply.final
    assert reply.ede is not None and reply.ede[0] == 0
    assert public.calls == 0  # the fallback was not asked
    assert overlay.replies["local-limit"] == 1
    # Nothing was cached: when the limit lifts, the overlay answers at once.
    overlay.max_lookups, method.limited = 256, False
    _, answer = ask(pipeline)
    assert answer == [(NODEB, overlay.hold)]


def test_forgetting_drops_the_overlay_view_in_every_layer_and_keeps_public_data() -> None:
    clock = Clock()
    pipeline, method, _public, overlay, caches = build(clock)
    ask(pipeline)
    ask(pipeline, "example.org.")  # zone "." only: public data
    method.present = False
    assert overlay.forget_overlay("link eth0 down") == 2
    dropped = sum(cache.forget_overlay("link eth0 down") for cache in caches)
    assert dropped == 1
    _, answer = ask(pipeline)
    assert answer == [(PUBLIC, overlay.hold)]
    assert len(caches[1].entries) == 1  # example.org is still cached


def test_switches_are_counted_and_explained() -> None:
    clock = Clock()
    pipeline, method, _public, overlay, _caches = build(clock)
    ask(pipeline)
    method.present = False
    clock.now += overlay.hold
    ask(pipeline)
    assert overlay.switches == {"inside": 0, "outside": 1}
    assert overlay.horizon["nodeb"].inside is False
    clock.now += overlay.hold  # past the caches: the stage itself is asked
    query = make_query("nodeb.mydomain.tld.")
    query.trace = []
    asyncio.run(pipeline.resolve(query))
    text = "\n".join(query.trace)
    assert "nodeb is outside" in text and "switches when nodeb answers again" in text


def test_sleep_counts_on_the_cache_clock() -> None:
    """8 hours of suspend: CLOCK_BOOTTIME moves on, so an entry is expired on waking."""
    clock = Clock()
    pipeline, _method, public, _overlay, _caches = build(clock)
    ask(pipeline, "example.org.")
    calls = public.calls
    clock.now += 8 * 3600  # asleep; time.monotonic would not have moved
    ask(pipeline, "example.org.")
    assert public.calls == calls + 1


def test_the_clock_is_boottime_where_the_kernel_has_it() -> None:
    if not hasattr(time, "CLOCK_BOOTTIME"):
        pytest.skip("no CLOCK_BOOTTIME on this platform")
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    now = clocks.now()
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= now <= after
    # Boot time includes every suspend; monotonic does not, so it can only be behind.
    assert time.monotonic() <= clocks.now() + 0.001


def test_the_watch_forgets_on_a_goodbye_for_an_inside_host_and_a_return_of_an_outside_one() -> None:
    clock = Clock()
    pipeline, method, _public, overlay, caches = build(clock)
    handler = QueryHandler(pipeline)
    watch = HorizonWatch(handler)
    ask(pipeline)  # nodeb inside, cached
    watch._mdns_record("printer", True)  # never asked about: nothing held, nothing to forget
    watch._mdns_record("nodeb", False)  # an announcement of a host already inside changes nothing
    assert not watch.moves and len(caches[0].entries) == 1

    method.present = False
    watch._mdns_record("nodeb", True)  # avahi on b stopped: its goodbye
    assert watch.moves == {"mdns-goodbye": 1} and not caches[0].entries and not overlay.known
    _, answer = ask(pipeline)
    assert answer == [(PUBLIC, overlay.hold)]  # at once, not after the hold

    method.present = True
    watch._mdns_record("nodeb", False)  # b announces itself again
    assert watch.moves["mdns-announce"] == 1
    _, answer = ask(pipeline)
    assert answer == [(NODEB, overlay.hold)]


def test_the_watch_forgets_on_a_link_change_and_the_hot_path_forgets_too() -> None:
    """The hot path's remembered reply must go with the entry it came from."""
    clock = Clock()
    pipeline, method, _public, _overlay, _caches = build(clock)
    handler = QueryHandler(pipeline)
    watch = HorizonWatch(handler)
    query = dns.message.make_query("nodeb.mydomain.tld.", "A").to_wire()
    first = asyncio.run(handler.handle(query, ("127.0.0.1", 5), "udp"))
    assert first is not None and NODEB in str(dns.message.from_wire(first))
    assert handler.hot_answer(query) is not None  # served from the hot path now
    method.present = False
    watch._link_changed("link eth0 down")
    assert watch.moves == {"link": 1} and watch.last is not None and "eth0" in watch.last[1]
    assert handler.hot_answer(query) is None
    after = asyncio.run(handler.handle(query, ("127.0.0.1", 5), "udp"))
    assert after is not None and PUBLIC in str(dns.message.from_wire(after))
