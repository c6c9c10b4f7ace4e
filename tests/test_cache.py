"""The cache stage: TTLs, negative caching, LRU, serve-stale, coalescing, the hot path."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rdatatype
import pytest
from dnslib import RR
from helpers import FakeClock as Clock
from helpers import config_from, make_query
from hypothesis import given, settings
from hypothesis import strategies as st

from horizon_dns.core import handler as handler_module
from horizon_dns.core.encode import TCP_LIMIT, encode_reply
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.message import Edns, Outcome, Query, Reply
from horizon_dns.core.names import name_to_text, text_to_name
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.stages.cache import EDE_STALE_ANSWER, STALE_RECHECK, STALE_TTL, CacheStage, query_key


class Next:
    """A scripted next stage that counts its calls."""

    def __init__(self, reply: Reply | None = None) -> None:
        self.calls = 0
        self.reply = reply or answer("192.0.2.1", ttl=60)
        self.gate: asyncio.Event | None = None

    async def __call__(self, query: Query) -> Reply:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.reply


def answer(address: str, ttl: int, name: str = "a.test.") -> Reply:
    return Reply(NOERROR, "next", Outcome.ANSWER, "next", answer=RR.fromZone(f"{name} {ttl} IN A {address}"))


def negative(rcode: int, soa_ttl: int, minimum: int) -> Reply:
    soa = RR.fromZone(f"test. {soa_ttl} IN SOA ns.test. h.test. 1 2 3 4 {minimum}")
    outcome = Outcome.NXDOMAIN if rcode == NXDOMAIN else Outcome.NODATA
    return Reply(rcode, "next", outcome, "next", authority=soa)


def run(cache: CacheStage, query: Query, next_: Next) -> Reply:
    return asyncio.run(cache.handle(query, next_))


def ttls(query: Query, reply: Reply) -> list[int]:
    message = dns.message.from_wire(encode_reply(query, reply, TCP_LIMIT, True))
    return [rrset.ttl for rrset in message.answer + message.authority]


def test_hit_is_served_with_ttl_decremented() -> None:
    clock, next_ = Clock(), Next()
    cache = CacheStage(clock=clock)
    first = run(cache, make_query("a.test."), next_)
    assert first.stage == "next" and next_.calls == 1
    clock.now += 10
    query = make_query("A.TeSt.")  # any letter case shares the entry
    hit = run(cache, query, next_)
    assert next_.calls == 1 and hit.stage == "cache" and hit.reason == "cache:hit"
    assert ttls(query, hit) == [50]
    message = dns.message.from_wire(encode_reply(query, hit, TCP_LIMIT, True))
    assert message.question[0].name.to_text() == "A.TeSt." and message.id == query.msg_id
    clock.now += 51
    run(cache, make_query("a.test."), next_)
    assert next_.calls == 2  # expired: asked again


def test_ttl_is_clamped() -> None:
    clock = Clock()
    cache = CacheStage(clock=clock, min_ttl=30, max_ttl=100)
    run(cache, make_query("a.test."), Next(answer("192.0.2.1", ttl=5)))
    run(cache, make_query("b.test."), Next(answer("192.0.2.1", ttl=5000, name="b.test.")))
    key_a, key_b = list(cache.entries)
    assert cache.lifetime(cache.entries[key_a]) == (clock.now, clock.now + 30)
    assert cache.lifetime(cache.entries[key_b]) == (clock.now, clock.now + 100)


@pytest.mark.parametrize("rcode", [NXDOMAIN, NOERROR])
def test_negative_answers_live_for_the_soa_minimum(rcode: int) -> None:
    # RFC 2308 §5: min(SOA TTL, SOA MINIMUM).
    clock, next_ = Clock(), Next(negative(rcode, soa_ttl=60, minimum=7))
    cache = CacheStage(clock=clock)
    run(cache, make_query("gone.test."), next_)
    clock.now += 6.5
    reply = run(cache, make_query("gone.test."), next_)
    assert next_.calls == 1 and reply.rcode == rcode
    clock.now += 1
    run(cache, make_query("gone.test."), next_)
    assert next_.calls == 2


def test_negative_answer_without_soa_is_not_cached() -> None:
    next_ = Next(Reply(NXDOMAIN, "next", Outcome.NXDOMAIN, "next"))
    cache = CacheStage(clock=Clock())
    run(cache, make_query("x.test."), next_)
    run(cache, make_query("x.test."), next_)
    assert next_.calls == 2 and not cache.entries


def test_servfail_and_client_specific_replies_are_not_cached() -> None:
    cache = CacheStage(clock=Clock(), servfail_ttl=0)  # 0: failures are not kept either
    failing = Next(Reply(SERVFAIL, "next", Outcome.FAILED, "next"))
    run(cache, make_query("x.test."), failing)
    personal = Next(answer("192.0.2.9", ttl=60))
    personal.reply.cacheable = False
    run(cache, make_query("a.test."), personal)
    assert not cache.entries


def test_key_separates_type_class_do_and_cd() -> None:
    cache, next_ = CacheStage(clock=Clock()), Next()
    queries = [make_query("a.test."), make_query("a.test.", "AAAA"), make_query("a.test.", qclass=3)]
    do = make_query("a.test.")
    do.edns = Edns(1232, 0, True)
    cd = make_query("a.test.")
    cd.flags |= 0x0010
    for query in [*queries, do, cd]:
        run(cache, query, next_)
    assert next_.calls == 5 and len(cache.entries) == 5


def test_serve_stale_when_what_follows_fails() -> None:
    clock = Clock()
    cache = CacheStage(clock=clock, max_stale=3600)
    run(cache, make_query("a.test."), Next())
    clock.now += 120  # expired
    failing = Next(Reply(SERVFAIL, "forward", Outcome.FAILED, "forward:unreachable"))
    query = make_query("a.test.", edns=True)
    reply = run(cache, query, failing)
    assert failing.calls == 1 and reply.rcode == NOERROR and reply.reason == "cache:stale"
    assert ttls(query, reply) == [STALE_TTL]
    message = dns.message.from_wire(encode_reply(query, reply, TCP_LIMIT, True))
    (ede,) = [o for o in message.options if o.otype == dns.edns.EDE]
    assert ede.code == EDE_STALE_ANSWER
    clock.now += 3600  # beyond max_stale: the failure is passed on
    assert run(cache, make_query("a.test."), failing).rcode == SERVFAIL


def test_after_a_failed_refresh_stale_is_served_at_once_for_a_while() -> None:
    """RFC 8767 §5, failure recheck timer: the upstreams are not waited out on every query."""
    clock = Clock()
    cache = CacheStage(clock=clock, max_stale=3600)
    run(cache, make_query("a.test."), Next())
    clock.now += 120  # expired
    failing = Next(Reply(SERVFAIL, "forward", Outcome.FAILED, "forward:unreachable"))
    assert run(cache, make_query("a.test."), failing).reason == "cache:stale"
    clock.now += STALE_RECHECK - 1
    assert run(cache, make_query("a.test."), failing).reason == "cache:stale"
    assert failing.calls == 1  # the second stale answer asked nobody
    clock.now += 2  # the recheck time is up: the upstreams are asked again
    working = Next()
    reply = run(cache, make_query("a.test."), working)
    assert working.calls == 1 and reply.reason != "cache:stale" and not cache.recheck


def test_concurrent_identical_misses_coalesce() -> None:
    cache, next_ = CacheStage(clock=Clock()), Next()

    async def scenario() -> list[Reply]:
        next_.gate = asyncio.Event()
        tasks = [asyncio.create_task(cache.handle(make_query("a.test."), next_)) for _ in range(10)]
        while cache.coalesced < 9:
            await asyncio.sleep(0)
        next_.gate.set()
        return await asyncio.gather(*tasks)

    replies = asyncio.run(scenario())
    assert next_.calls == 1 and cache.coalesced == 9
    assert all(r.rcode == NOERROR for r in replies)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 8),
    names=st.lists(st.sampled_from([f"n{i}.test." for i in range(12)]), min_size=1, max_size=60),
)
def test_bound_and_every_eviction_counted(size: int, names: list[str]) -> None:
    cache = CacheStage(clock=Clock(), max_entries=size)
    next_ = Next()
    for name in names:
        run(cache, make_query(name), next_)
        assert len(cache.entries) <= size
        # What was just asked is kept: eviction never takes the newest entry.
        assert cache.serve_fresh(query_key(make_query(name))) is not None
    assert cache.evictions == next_.calls - len(cache.entries)


def _names(cache: CacheStage) -> list[str]:
    return [name_to_text(key[:-5]) for key in cache.entries]


def test_an_entry_used_since_the_last_sweep_gets_a_second_chance() -> None:
    """CLOCK: the oldest unused entry goes first; a used one moves to the end, unmarked."""
    cache = CacheStage(clock=Clock(), max_entries=3)
    next_ = Next()
    for name in ("a.test.", "b.test.", "c.test."):
        run(cache, make_query(name), next_)
    run(cache, make_query("a.test."), next_)  # a hit: a is used, b is now the oldest unused
    run(cache, make_query("d.test."), next_)
    assert [bytes(key[:-5]) for key in cache.entries] == [
        text_to_name(n) for n in ("c.test.", "d.test.", "a.test.")
    ]
    run(cache, make_query("e.test."), next_)  # a's mark was spent: c (oldest, unused) goes
    assert [bytes(key[:-5]) for key in cache.entries] == [
        text_to_name(n) for n in ("d.test.", "a.test.", "e.test.")
    ]
    assert cache.evictions == 2 and next_.calls == 5


def test_a_full_cache_evicts_in_sweeps_of_a_64th() -> None:
    cache = CacheStage(clock=Clock(), max_entries=640)
    next_ = Next()
    for i in range(641):
        run(cache, make_query(f"n{i}.test."), next_)
    assert len(cache.entries) == 630 and cache.evictions == 11
    assert query_key(make_query("n0.test.")) not in cache.entries  # the oldest went first
    assert query_key(make_query("n11.test.")) in cache.entries


@settings(max_examples=200, deadline=None)
@given(
    ttl=st.integers(1, 10**6),
    age=st.integers(0, 10**6),
    floor=st.integers(0, 300),
    cap=st.integers(300, 10**5),
)
def test_ttl_arithmetic(ttl: int, age: int, floor: int, cap: int) -> None:
    clock = Clock()
    cache = CacheStage(clock=clock, min_ttl=floor, max_ttl=cap)
    run(cache, make_query("a.test."), Next(answer("192.0.2.1", ttl=ttl)))
    lifetime = max(floor, min(ttl, cap))
    clock.now += age
    fresh = cache.serve_fresh(next(iter(cache.entries)))
    if age >= lifetime:
        assert fresh is None
    else:
        assert fresh is not None
        packed, body, _expires, _entry, _age = fresh
        reply = Reply(NOERROR, "cache", Outcome.ANSWER, "hit", packed=replace(packed, body=body))
        assert ttls(make_query("a.test."), reply) == [lifetime - age]


# The hot path ---------------------------------------------------------------------

HOT_RULES = r"""
zones:
  hot.test:
    stages:
      - cache: {}
      - template:
          type: [A]
          answer: ['{{ name }} 60 IN A 192.0.2.7']
"""


@pytest.mark.parametrize("edns", [False, True])
def test_fast_path_gives_the_same_bytes_as_the_full_path(tmp_path: Path, edns: bool) -> None:
    config = config_from(tmp_path, HOT_RULES)
    handler = QueryHandler(config.pipeline())
    wire = dns.message.make_query(
        "Www.Hot.Test", "A", use_edns=0 if edns else False, want_dnssec=edns
    ).to_wire()
    assert handler.hot_answer(wire) is None  # nothing cached yet
    slow = asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp"))
    assert slow is not None
    fast = handler.hot_answer(wire)
    assert fast is not None and handler.hot_hits == 1
    # Same question echo, flags, records; the TTL may only have aged.
    assert fast == asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp"))
    message = dns.message.from_wire(fast)
    assert message.question[0].name.to_text() == "Www.Hot.Test."
    assert (message.edns == 0) is edns and bool(message.ednsflags & dns.flags.DO) is edns


def test_fast_path_declines_what_it_cannot_serve(tmp_path: Path) -> None:
    config = config_from(tmp_path, HOT_RULES)
    handler = QueryHandler(config.pipeline())
    wire = dns.message.make_query("a.hot.test", "A").to_wire()
    asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp"))
    assert handler.hot_answer(wire) is not None
    bad_version = dns.message.make_query("a.hot.test", "A", use_edns=1).to_wire()
    assert handler.hot_answer(bad_version) is None  # BADVERS needs the full path
    response = bytearray(wire)
    response[2] |= 0x80
    assert handler.hot_answer(bytes(response)) is None  # QR=1
    assert handler.hot_answer(wire[:-1]) is None
    assert handler.hot_answer(dns.message.make_query("a.other.test", "A").to_wire()) is None


CHAIN_RULES = r"""
zones:
  hot.test:
    stages:
      - cache: {}
      - template:
          name: cname
          type: [A]
          match: ['^www\.(?P<h>[^.]+)\.hot\.test\.$']
          answer: ['{{ name }} 60 IN CNAME {{ group.h }}.hot.test.']
      - template:
          name: host
          type: [A]
          match: ['^node[a-z]\.hot\.test\.$']
          answer: ['{{ name }} 30 IN A 100.64.0.2']
"""


def test_leading_cache_keeps_the_chased_chain_for_the_hot_path(tmp_path: Path) -> None:
    # The CNAME is chased after the chain; the leading cache must hold the whole
    # chain, or the hot path would hand out a dangling CNAME.
    config = config_from(tmp_path, CHAIN_RULES)
    handler = QueryHandler(config.pipeline())
    wire = dns.message.make_query("www.nodeb.hot.test", "A").to_wire()
    slow = asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp"))
    fast = handler.hot_answer(wire)
    assert slow is not None and fast is not None
    for data in (slow, fast):
        message = dns.message.from_wire(data)
        assert [r.rdtype for r in message.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    # The target was cached on its own too.
    target = dns.message.make_query("nodeb.hot.test", "A").to_wire()
    assert handler.hot_answer(target) is not None


def test_remembered_replies_differ_only_in_id_and_end_with_a_reload(tmp_path: Path) -> None:
    config = config_from(tmp_path, HOT_RULES)
    handler = QueryHandler(config.pipeline())
    first = dns.message.make_query("a.hot.test", "A", use_edns=0)
    asyncio.run(handler.handle(first.to_wire(), ("127.0.0.1", 1), "udp"))
    one = handler.hot_answer(first.to_wire())
    first.id = (first.id + 1) % 65536
    two = handler.hot_answer(first.to_wire())
    assert one is not None and two is not None and one[2:] == two[2:] and one[:2] != two[:2]
    assert dns.message.from_wire(two).id == first.id
    handler.pipeline = config_from(tmp_path, HOT_RULES.replace("192.0.2.7", "192.0.2.8")).pipeline()
    assert handler.hot_answer(first.to_wire()) is None  # nothing remembered across a reload


def leading_cache(handler: QueryHandler) -> CacheStage:
    found = handler.pipeline.zone_for_wire(text_to_name("hot.test."))
    assert found is not None and isinstance(found[1], CacheStage)
    return found[1]


def cached_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rules: str = HOT_RULES, query: bytes | None = None
) -> tuple[Clock, QueryHandler, bytes]:
    """A handler whose reply memo and leading cache run on one test clock, and the
    query (``a.hot.test A`` unless given) it has answered once by the full path."""
    clock = Clock()
    monkeypatch.setattr(handler_module, "clock_now", clock)
    handler = QueryHandler(config_from(tmp_path, rules).pipeline())
    cache = leading_cache(handler)
    cache.clock = clock
    cache.epoch = clock.now - 1.0  # as the cache's own: a second before its start
    wire = query if query is not None else dns.message.make_query("a.hot.test", "A").to_wire()
    asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp"))
    return clock, handler, wire


def test_a_remembered_reply_ages_with_its_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The memo keeps a reply for under a second, then lowers its TTLs in place: the
    # bytes must stay those of a reply built afresh from the entry (RFC 1035 §3.2.1).
    query = dns.message.make_query("A.hot.test", "A", use_edns=0).to_wire()
    clock, handler, wire = cached_once(tmp_path, monkeypatch, query=query)
    for age in (0, 1, 2, 7, 59):
        clock.now = 1000.0 + age + 0.05
        remembered = handler.hot_answer(wire)
        afresh = QueryHandler(handler.pipeline).hot_answer(wire)  # same cache, empty memo
        assert remembered is not None and remembered == afresh
        assert dns.message.from_wire(remembered).answer[0].ttl == 60 - age
    clock.now = 1060.5
    assert handler.hot_answer(wire) is None  # the entry expired: the full path asks again


def test_a_remembered_reply_goes_with_its_evicted_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, handler, wire = cached_once(tmp_path, monkeypatch)
    assert handler.hot_answer(wire) is not None
    leading_cache(handler).entries.clear()
    clock.now += 1.0
    assert handler.hot_answer(wire) is None


def test_a_remembered_truncated_reply_is_renewed_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 A records do not fit 512 bytes: the reply has TC=1 and no records, so
    # renewing it must touch none of its bytes (RFC 2181 §9).
    answers = ", ".join(f"'{{{{ name }}}} 60 IN A 192.0.2.{i}'" for i in range(40))
    rules = HOT_RULES.replace("['{{ name }} 60 IN A 192.0.2.7']", f"[{answers}]")
    clock, handler, wire = cached_once(tmp_path, monkeypatch, rules)
    first = handler.hot_answer(wire)
    assert first is not None and dns.message.from_wire(first).flags & dns.flags.TC
    clock.now += 3.0
    assert handler.hot_answer(wire) == first


def test_remembered_serves_only_a_valid_reply_and_nothing_while_the_query_log_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, handler, wire = cached_once(tmp_path, monkeypatch)
    assert handler.hot_answer_known(wire, clock.now) is None  # nothing remembered before hot_answer
    fast = handler.hot_answer(wire)
    assert fast is not None and handler.hot_answer_known(wire, clock.now) == fast
    assert handler.hot_answer_known(wire, clock.now + 1.0) is None  # past its second: hot_answer renews
    handler.hot_enabled = False  # the query log must see every query
    assert handler.hot_answer_known(wire, clock.now) is None


def test_ttls_never_rise_behind_a_clamping_cache_in_a_cname_chain(tmp_path: Path) -> None:
    """One representation, one TTL rule: a cache in the middle of a zone clamps the
    CNAME it passes on, and the client sees the clamped TTL the first time already --
    never 60 first and 299 a second later."""
    config = config_from(
        tmp_path,
        """
        zones:
          t.test:
            stages:
              - template: {name: mx, type: MX, answer: ['{{ name }} 60 IN MX 10 mx.t.test.']}
              - cache: {min_ttl: 300}
              - template:
                  name: alias
                  type: [A]
                  match: ['^a\\.t\\.test\\.$']
                  answer: ['{{ name }} 60 IN CNAME b.t.test.']
              - template: {name: addr, type: [A], answer: ['{{ name }} 300 IN A 192.0.2.9']}
        """,
    )
    pipeline = config.pipeline()
    clock = Clock()
    for stage in pipeline.stages:
        if isinstance(stage, CacheStage):
            stage.clock = clock
            stage.epoch = clock() - 1.0

    def ask() -> list[int]:
        query = make_query("a.t.test.")
        reply, _zone = asyncio.run(pipeline.resolve(query))
        return ttls(query, reply)

    first = ask()
    clock.now += 1
    second = ask()
    assert first == [300, 300]
    assert second == [299, 299]
