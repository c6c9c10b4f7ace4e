"""Forward and cache against the RFCs: TTL rules, AA, negative TTLs, failure caching,
EDNS fallback, final answers, REFUSED, EDE texts. Upstreams are scripted fakes on
loopback; the cache runs on a test clock."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord, EDNSOption
from fakeupstream import FakeUpstream
from helpers import FakeClock as Clock
from helpers import config_from, make_query

from horizon_dns.core import handler as handler_module
from horizon_dns.core.encode import TCP_LIMIT, encode_reply
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.message import Outcome, Query, Reply
from horizon_dns.core.names import text_to_name
from horizon_dns.core.packed import bounded_ttls, from_upstream
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.errors import ConfigError
from horizon_dns.net.upstream import exchange_udp, parse_upstream
from horizon_dns.stages.cache import CacheStage
from horizon_dns.stages.forward import EDE_NO_REACHABLE_AUTHORITY, UNREACHABLE_TEXT, ForwardStage

Script = Callable[[DNSRecord, bytes], list[bytes]]


class Scripted(FakeUpstream):
    """A fake upstream whose replies for some names a test function builds from the
    request; ``requests`` keeps every request's bytes for those names."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, Script] = {}
        self.requests: list[bytes] = []

    async def answer(self, data: bytes, transport: str) -> list[bytes]:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return []
        name = str(request.q.qname).lower()
        script = self.scripts.get(name)
        if script is None:
            return await super().answer(data, transport)
        self.log.append((name, QTYPE.get(request.q.qtype), transport))
        self.requests.append(data)
        return script(request, data)


@contextmanager
def scripted() -> Iterator[Scripted]:
    fake = Scripted()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake() -> Iterator[Scripted]:
    with scripted() as upstream:
        yield upstream


def has_opt(request: bytes) -> bool:
    return any(rr.rtype == QTYPE.OPT for rr in DNSRecord.parse(request).ar)


def a_reply(ttl: int, aa: bool = False, ad: bool = False) -> Script:
    def script(request: DNSRecord, _data: bytes) -> list[bytes]:
        reply = request.reply()
        reply.header.aa = 1 if aa else 0
        reply.header.ad = 1 if ad else 0
        reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=ttl, rdata=A("192.0.2.1")))
        return [reply.pack()]

    return script


def negative_reply(soa_ttl: int, minimum: int, aa: bool = False) -> Script:
    def script(request: DNSRecord, _data: bytes) -> list[bytes]:
        reply = request.reply()
        reply.header.aa = 1 if aa else 0
        reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(*RR.fromZone(f"test. {soa_ttl} IN SOA ns.test. h.test. 1 3600 600 86400 {minimum}"))
        return [reply.pack()]

    return script


def forward(*upstreams: str, **kwargs: object) -> ForwardStage:
    return ForwardStage("forward:test", [parse_upstream(u) for u in upstreams], **kwargs)  # type: ignore[arg-type]


async def _no_next(query: Query) -> Reply:
    raise AssertionError("forward must not call next")


def through(cache: CacheStage, stage: ForwardStage) -> Callable[[Query], Reply]:
    """Ask ``cache`` with ``stage`` behind it, as a zone [cache, forward] would."""

    async def next_(query: Query) -> Reply:
        return await stage.handle(query, _no_next)

    def ask(query: Query) -> Reply:
        return asyncio.run(cache.handle(query, next_))

    return ask


def as_dns(query: Query, reply: Reply) -> dns.message.Message:
    return dns.message.from_wire(encode_reply(query, reply, TCP_LIMIT, True))


def answer_ttls(query: Query, reply: Reply) -> list[int]:
    message = as_dns(query, reply)
    return [rrset.ttl for rrset in message.answer + message.authority]


# The real shape: a zone whose cache comes first (stores final replies, hot path) ----

ZONE = """
zones:
  .:
    stages:
      - cache: {{{cache}}}
      - forward: {{upstreams: ["{upstream}"], timeout: {timeout}}}
"""


def leading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: str, cache: str = "", timeout: float = 1.0
) -> tuple[Clock, QueryHandler]:
    """A handler for ZONE whose leading cache and reply memo run on one test clock."""
    clock = Clock()
    monkeypatch.setattr(handler_module, "clock_now", clock)
    config = config_from(tmp_path, ZONE.format(cache=cache, upstream=upstream, timeout=timeout))
    handler = QueryHandler(config.pipeline())
    found = handler.pipeline.zone_for_wire(text_to_name("."))
    assert found is not None and isinstance(found[1], CacheStage)
    found[1].clock = clock
    found[1].epoch = clock.now - 1.0
    return clock, handler


def full(handler: QueryHandler, name: str, qtype: str = "A") -> dns.message.Message:
    """The reply by the full path (a miss fills the cache)."""
    wire = dns.message.make_query(name, qtype, use_edns=0).to_wire()
    data = asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp"))
    assert data is not None
    return dns.message.from_wire(data)


def hot(handler: QueryHandler, name: str, qtype: str = "A") -> dns.message.Message:
    """The reply by the hot path (a cache hit) built afresh from the cache entry (an
    empty reply memo: the memo's own renewal is the handler's business); fails on a miss."""
    wire = dns.message.make_query(name, qtype, use_edns=0).to_wire()
    data = QueryHandler(handler.pipeline).hot_answer(wire)
    assert data is not None, "expected a cache hit"
    return dns.message.from_wire(data)


def ttls_of(message: dns.message.Message) -> list[int]:
    return [rrset.ttl for rrset in message.answer + message.authority]


# 1. TTL clamps apply to the reply that fills the cache ---------------------------


@pytest.mark.parametrize(("upstream_ttl", "first"), [(5, 30), (300, 100)])
def test_first_reply_shows_the_clamped_ttl_and_ttls_never_rise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Scripted, upstream_ttl: int, first: int
) -> None:
    fake.scripts["c.example."] = a_reply(upstream_ttl)
    clock, handler = leading(tmp_path, monkeypatch, fake.address, "min_ttl: 30, max_ttl: 100")
    seen = [ttls_of(full(handler, "c.example."))]
    for _ in range(2):
        clock.now += 1.0
        seen.append(ttls_of(hot(handler, "c.example.")))
    assert seen == [[first], [first - 1], [first - 2]]
    assert fake.names() == ["c.example."]


def test_stage_level_first_reply_is_clamped(fake: Scripted) -> None:
    # A cache that is not first in its zone stores in its own handle(): same rule.
    fake.scripts["c.example."] = a_reply(5)
    clock = Clock()
    ask = through(CacheStage(clock=clock, min_ttl=30), forward(fake.address))
    query = make_query("c.example.")
    assert answer_ttls(query, ask(query)) == [30]
    clock.now += 1.0
    assert answer_ttls(query, ask(query)) == [29]


# 2. RFC 2181 §8: a TTL with the high bit set is 0 ----------------------------------


def test_ttl_with_the_high_bit_set_is_zero_and_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Scripted
) -> None:
    fake.scripts["msb.example."] = a_reply(0x80000010)
    _clock, handler = leading(tmp_path, monkeypatch, fake.address)
    assert ttls_of(full(handler, "msb.example.")) == [0]
    assert ttls_of(full(handler, "msb.example.")) == [0]
    assert fake.names() == ["msb.example.", "msb.example."]  # not cached: asked again


def test_bounded_ttls_reads_a_high_bit_soa_minimum_as_zero() -> None:
    reply = DNSRecord.question("x.test.", "A").reply()
    reply.header.rcode = RCODE.NXDOMAIN
    reply.add_auth(*RR.fromZone("test. 60 IN SOA ns.test. h.test. 1 2 3 4 2147483664"))
    data = reply.pack()
    packed = from_upstream(data, 12 + len(text_to_name("x.test.")) + 4)
    assert packed.negative_ttl() == 0
    assert bounded_ttls(packed).ttls[0][1] == 0


# 3. AA cleared in forwarded and cached answers -----------------------------------


def test_aa_is_cleared_in_forwarded_and_cached_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Scripted
) -> None:
    fake.scripts["aa.example."] = a_reply(60, aa=True)
    fake.scripts["aanx.example."] = negative_reply(60, 5, aa=True)
    clock, handler = leading(tmp_path, monkeypatch, fake.address)
    for name in ("aa.example.", "aanx.example."):
        first = full(handler, name)
        clock.now += 1.0
        cached = hot(handler, name)
        assert first.flags & dns.flags.QR and first.flags & dns.flags.RA
        assert not first.flags & dns.flags.AA and not cached.flags & dns.flags.AA


def test_ad_reaches_only_a_client_that_asked_with_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Scripted
) -> None:
    """RFC 6840 §5.8: AD only to a client that set DO (the cache keeps DO apart)."""
    fake.scripts["ad.example."] = a_reply(60, ad=True)
    _clock, handler = leading(tmp_path, monkeypatch, fake.address)
    for want_dnssec in (False, True):
        query = dns.message.make_query("ad.example.", "A", want_dnssec=want_dnssec)
        data = asyncio.run(handler.handle(query.to_wire(), ("127.0.0.1", 1), "udp"))
        assert data is not None
        assert bool(dns.message.from_wire(data).flags & dns.flags.AD) is want_dnssec


# 4. RFC 2308 §5: the SOA of a negative answer carries the negative TTL -------------


def test_negative_answer_soa_ttl_is_the_negative_ttl_counting_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Scripted
) -> None:
    fake.scripts["nx.example."] = negative_reply(60, 5)
    clock, handler = leading(tmp_path, monkeypatch, fake.address)
    first = full(handler, "nx.example.")
    assert first.rcode() == dns.rcode.NXDOMAIN and ttls_of(first) == [5]
    clock.now += 3.0
    assert ttls_of(hot(handler, "nx.example.")) == [2]
    assert fake.names() == ["nx.example."]


def test_negative_ttl_is_capped_by_max_negative_ttl_in_the_first_reply(fake: Scripted) -> None:
    fake.scripts["nx.example."] = negative_reply(60, 50)
    clock = Clock()
    cache = CacheStage(clock=clock, max_negative_ttl=10)
    ask = through(cache, forward(fake.address))
    query = make_query("nx.example.")
    first = ask(query)
    assert first.rcode == NXDOMAIN and answer_ttls(query, first) == [10]
    clock.now += 4.0
    assert answer_ttls(query, ask(query)) == [6]


def test_forwarded_negative_answer_alone_carries_min_of_soa_ttl_and_minimum(fake: Scripted) -> None:
    fake.scripts["nx.example."] = negative_reply(60, 5)
    query = make_query("nx.example.")
    reply = asyncio.run(forward(fake.address).handle(query, _no_next))
    assert answer_ttls(query, reply) == [5]


# 5. Resolution failures are cached briefly (RFC 9520 §3.2) ----------------------


def test_servfail_is_cached_for_servfail_ttl_then_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Scripted
) -> None:
    fake.behaviours["dead.example."] = "drop"
    clock, handler = leading(tmp_path, monkeypatch, fake.address, timeout=0.2)
    assert full(handler, "dead.example.").rcode() == dns.rcode.SERVFAIL
    assert fake.names() == ["dead.example."]
    clock.now += 0.5
    # Within servfail_ttl (1 s): SERVFAIL at once, from the cache, upstream not asked.
    again = hot(handler, "dead.example.")
    (ede,) = [o for o in again.options if o.otype == dns.edns.EDE]
    assert again.rcode() == dns.rcode.SERVFAIL and ede.code == EDE_NO_REACHABLE_AUTHORITY
    assert fake.names() == ["dead.example."]
    # Recovery shows after the second: the upstream answers again.
    clock.now += 0.6
    fake.behaviours["dead.example."] = "answer"
    recovered = full(handler, "dead.example.")
    assert recovered.rcode() == dns.rcode.NOERROR and recovered.answer
    assert fake.names() == ["dead.example.", "dead.example."]


def test_servfail_ttl_zero_turns_the_failure_cache_off() -> None:
    failing = Reply(SERVFAIL, "forward", Outcome.FAILED, "forward:unreachable")
    calls = 0

    async def next_(query: Query) -> Reply:
        nonlocal calls
        calls += 1
        return failing

    cache = CacheStage(clock=Clock(), servfail_ttl=0)
    for _ in range(2):
        asyncio.run(cache.handle(make_query("x.test."), next_))
    assert calls == 2 and not cache.entries


def test_a_failure_never_replaces_an_entry_serve_stale_can_use() -> None:
    clock = Clock()
    cache = CacheStage(clock=clock, max_stale=3600)
    good = Reply(NOERROR, "next", Outcome.ANSWER, "next", answer=RR.fromZone("a.test. 10 IN A 192.0.2.1"))
    failing = Reply(SERVFAIL, "forward", Outcome.FAILED, "forward:unreachable")
    replies = [good]

    async def next_(query: Query) -> Reply:
        return replies[0]

    asyncio.run(cache.handle(make_query("a.test."), next_))
    clock.now += 20  # expired
    replies[0] = failing
    for _ in range(2):
        reply = asyncio.run(cache.handle(make_query("a.test."), next_))
        assert reply.reason == "cache:stale"
    # Even a leading cache's store of the final SERVFAIL keeps the stale entry.
    cache.store_final(make_query("a.test."), failing)
    (entry,) = cache.entries.values()
    assert entry.outcome is Outcome.ANSWER


def test_overload_servfail_is_not_cached() -> None:
    # Shedding is about our own load, not the name: not a resolution failure.
    stage = forward("127.0.0.1:9", max_outstanding=1)
    stage.outstanding = 1
    reply = asyncio.run(stage.handle(make_query("x.test."), _no_next))
    assert reply.rcode == SERVFAIL and not reply.cacheable


# 6. EDNS fallback (RFC 6891 §7) -------------------------------------------------


def _formerr(with_question: bool) -> Script:
    def script(request: DNSRecord, data: bytes) -> list[bytes]:
        if not has_opt(data):
            return a_reply(60)(request, data)
        if with_question:
            reply = request.reply()
            reply.header.rcode = RCODE.FORMERR
            reply.ar = []
            return [reply.pack()]
        # An old server: FORMERR with our ID and no question section.
        return [struct.pack("!HHHHHH", request.header.id, 0x8001, 0, 0, 0, 0)]

    return script


@pytest.mark.parametrize("with_question", [True, False])
def test_formerr_to_opt_is_retried_without_opt(fake: Scripted, with_question: bool) -> None:
    fake.scripts["old.example."] = _formerr(with_question)
    query = make_query("old.example.", edns=True)
    reply = asyncio.run(forward(fake.address, timeout=0.5, total_timeout=0.8).handle(query, _no_next))
    assert reply.rcode == NOERROR and [str(r) for r in as_dns(query, reply).answer[0]] == ["192.0.2.1"]
    assert [has_opt(r) for r in fake.requests] == [True, False]


def test_formerr_without_a_question_passes_the_exchange_checks(fake: Scripted) -> None:
    fake.scripts["old.example."] = _formerr(False)
    question = text_to_name("old.example.") + struct.pack("!HH", 1, 1)
    message = ForwardStage._message(0x1234, 0x0100, question, False)

    async def run() -> bytes:
        return await exchange_udp(parse_upstream(fake.address), message, 12 + len(question), 1.0)

    data = asyncio.run(run())
    assert data[:2] == b"\x12\x34" and data[3] & 0xF == 1


def test_formerr_without_opt_moves_on_but_never_marks_the_upstream_down() -> None:
    """It answers, it just will not take this question: a client must not be able to
    mark our upstreams down by asking for a meta-type three times."""

    def always_formerr(request: DNSRecord, _data: bytes) -> list[bytes]:
        reply = request.reply()
        reply.header.rcode = RCODE.FORMERR
        return [reply.pack()]

    with scripted() as bad, scripted() as good:
        bad.scripts["x.example."] = always_formerr
        query = make_query("x.example.", edns=True)
        stage = forward(bad.address, good.address, timeout=0.5)
        reply = asyncio.run(stage.handle(query, _no_next))
        assert reply.rcode == NOERROR and good.names() == ["x.example."]
        assert [has_opt(r) for r in bad.requests] == [True, False]
        # With only that upstream the client gets SERVFAIL, never the FORMERR ...
        alone = forward(bad.address, timeout=0.5)
        for _ in range(4):
            assert asyncio.run(alone.handle(query, _no_next)).rcode == SERVFAIL
        # ... and the upstream stays in service.
        assert stage.states[0].failures == 0 and alone.states[0].failures == 0
        assert alone.states[0].down_until == 0


# 7. A forwarded answer is final: its CNAMEs are not chased again ---------------


def cname_then_nodata(request: DNSRecord, _data: bytes) -> list[bytes]:
    """A recursive upstream's whole answer: CNAME to t.example., which has no such type."""
    reply = request.reply()
    reply.add_answer(*RR.fromZone(f"{request.q.qname} 60 IN CNAME t.example."))
    reply.add_auth(*RR.fromZone("example. 60 IN SOA ns.example. h.example. 1 2 3 4 30"))
    return [reply.pack()]


def test_forwarded_cname_answer_is_not_chased(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Scripted
) -> None:
    fake.scripts["c.example."] = cname_then_nodata
    _clock, handler = leading(tmp_path, monkeypatch, fake.address)
    message = full(handler, "c.example.")
    assert [r.rdtype for r in message.answer] == [dns.rdatatype.CNAME]
    assert [r.rdtype for r in message.authority] == [dns.rdatatype.SOA]
    assert fake.names() == ["c.example."]  # t.example. was not asked


def test_our_cname_to_a_forwarded_cname_stops_where_the_upstream_stopped(
    tmp_path: Path, fake: Scripted
) -> None:
    """Our template's CNAME is chased once into zone "."; the upstream's answer there is final."""

    fake.scripts["c.example."] = cname_then_nodata
    rules = f"""
    zones:
      mydomain.tld:
        stages:
          - template: {{answer: ['{{{{ name }}}} 60 IN CNAME c.example.']}}
      .:
        stages:
          - forward: {{upstreams: ["{fake.address}"]}}
    """
    handler = QueryHandler(config_from(tmp_path, rules).pipeline())
    message = full(handler, "alias.mydomain.tld.")
    assert [str(r.name) for r in message.answer] == ["alias.mydomain.tld.", "c.example."]
    assert [r.rdtype for r in message.authority] == [dns.rdatatype.SOA]
    assert fake.names() == ["c.example."]  # t.example. was not asked


# 8. REFUSED does not mark an upstream down ---------------------------------------


def test_refused_moves_on_but_never_marks_the_upstream_down() -> None:
    with scripted() as picky, scripted() as good:
        picky.default = "refused"
        picky.behaviours["mine.example."] = "answer"
        stage = forward(picky.address, good.address)

        async def run() -> Reply:
            for i in range(5):
                reply = await stage.handle(make_query(f"n{i}.example."), _no_next)
                assert reply.rcode == NOERROR  # from the next upstream
            return await stage.handle(make_query("mine.example."), _no_next)

        mine = asyncio.run(run())
        assert mine.rcode == NOERROR and "mine.example." in picky.names()
        assert stage.states[0].down_until == 0 and stage.states[0].failures == 0
        assert len(good.names()) == 5


# 9. EDE text: generic for clients; an upstream's own EDE passed on -------------


def test_ede_text_hides_addresses_and_exceptions() -> None:
    # Port 9 on loopback: nothing listens; the error is ECONNREFUSED or a timeout.
    query = make_query("x.example.", edns=True)
    query.trace = []
    reply = asyncio.run(forward("127.0.0.1:9", timeout=0.3).handle(query, _no_next))
    (ede,) = [o for o in as_dns(query, reply).options if o.otype == dns.edns.EDE]
    assert ede.code == EDE_NO_REACHABLE_AUTHORITY and ede.text == UNREACHABLE_TEXT
    assert "127.0.0.1" not in (ede.text or "")
    assert any("127.0.0.1:9" in line for line in query.trace)  # the details stay for explain


def test_upstream_servfail_ede_is_passed_on(fake: Scripted) -> None:
    def servfail_with_ede(request: DNSRecord, _data: bytes) -> list[bytes]:
        reply = request.reply()
        reply.header.rcode = RCODE.SERVFAIL
        reply.ar = []
        reply.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(15, b"\x00\x06DNSSEC Bogus")]))
        return [reply.pack()]

    fake.scripts["bogus.example."] = servfail_with_ede
    query = make_query("bogus.example.", edns=True)
    reply = asyncio.run(forward(fake.address).handle(query, _no_next))
    (ede,) = [o for o in as_dns(query, reply).options if o.otype == dns.edns.EDE]
    assert reply.rcode == SERVFAIL and ede.code == 6 and ede.text == "DNSSEC Bogus"


# 10. Remaining TTL floored ----------------------------------------------------


def test_remaining_ttl_is_floored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Scripted) -> None:
    fake.scripts["tick.example."] = a_reply(3)
    clock, handler = leading(tmp_path, monkeypatch, fake.address)
    assert ttls_of(full(handler, "tick.example.")) == [3]
    clock.now += 1.2  # 1.8 s remain
    assert ttls_of(hot(handler, "tick.example.")) == [1]


def test_remaining_ttl_is_floored_in_the_stage(fake: Scripted) -> None:
    fake.scripts["tick.example."] = a_reply(60)
    clock = Clock()
    ask = through(CacheStage(clock=clock), forward(fake.address))
    query = make_query("tick.example.")
    ask(query)
    for elapsed, expected in ((0.0, 60), (0.5, 59), (1.0, 59), (1.2, 58), (10.0, 50)):
        clock.now = 1000.0 + elapsed
        assert answer_ttls(query, ask(query)) == [expected], elapsed
    assert fake.names() == ["tick.example."]


# Other classes are not relayed; a forward stage needs an upstream ----------------


def test_chaos_queries_are_refused_not_forwarded(tmp_path: Path, fake: Scripted) -> None:
    """version.bind CH TXT would otherwise tell clients the upstream's software (RFC 4892 §2)."""
    rules = f"""
    zones:
      .:
        stages:
          - forward: {{upstreams: ["{fake.address}"]}}
    """
    handler = QueryHandler(config_from(tmp_path, rules).pipeline())
    for name in ("version.bind.", "id.server."):
        wire = dns.message.make_query(name, "TXT", rdclass="CH", use_edns=0).to_wire()
        reply = dns.message.from_wire(asyncio.run(handler.handle(wire, ("127.0.0.1", 1), "udp")) or b"")
        assert reply.rcode() == dns.rcode.REFUSED
    assert fake.names() == []


def test_a_forward_stage_without_upstreams_is_a_config_error(tmp_path: Path) -> None:
    rules = """
    zones:
      .:
        stages:
          - forward: {upstreams: []}
    """
    with pytest.raises(ConfigError) as info:
        config_from(tmp_path, rules)
    issue = next(i for i in info.value.issues if "no upstreams" in i.message)
    assert issue.line == 5 and "resolv.conf" in issue.hint
