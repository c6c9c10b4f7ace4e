"""The forward stage against a scriptable fake upstream and real dnsmasq/unbound on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest
from conftest import start_server
from fakeupstream import FakeUpstream, fake_upstream
from helpers import make_query
from peers import dnsmasq, unbound

from horizon_dns.core.encode import TCP_LIMIT, encode_reply
from horizon_dns.core.loop import LoopGuard
from horizon_dns.core.message import Edns, Outcome, Query, Reply
from horizon_dns.core.wire import NOERROR, NXDOMAIN, SERVFAIL
from horizon_dns.net.upstream import Upstream, parse_upstream
from horizon_dns.stages.forward import EDE_NO_REACHABLE_AUTHORITY, UNREACHABLE_TEXT, ForwardStage


async def _no_next(query: Query) -> Reply:
    raise AssertionError("forward must not call next")


def forward(*upstreams: str, **kwargs: object) -> ForwardStage:
    return ForwardStage("forward:test", [parse_upstream(u) for u in upstreams], **kwargs)  # type: ignore[arg-type]


def ask(stage: ForwardStage, query: Query) -> Reply:
    async def run() -> Reply:
        await stage.start()
        try:
            return await stage.handle(query, _no_next)
        finally:
            await stage.stop()

    return asyncio.run(run())


def as_dns(query: Query, reply: Reply) -> dns.message.Message:
    return dns.message.from_wire(encode_reply(query, reply, TCP_LIMIT, True))


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


def test_answer_is_relayed_with_client_id_and_case(fake: FakeUpstream) -> None:
    query = make_query("WwW.Example.TEST.", edns=True)
    reply = ask(forward(fake.address), query)
    assert reply.rcode == NOERROR and reply.outcome is Outcome.ANSWER and reply.stage == "forward:test"
    message = as_dns(query, reply)
    assert message.id == query.msg_id
    assert message.question[0].name.to_text() == "WwW.Example.TEST."
    assert [str(rr) for rr in message.answer[0]] == ["192.0.2.1"]
    assert message.flags & dns.flags.RA and message.edns == 0
    assert fake.log == [("www.example.test.", "A", "udp")]


@pytest.mark.parametrize("behaviour", ["wrong-id", "wrong-question", "wrong-port"])
def test_spoofed_replies_are_ignored(fake: FakeUpstream, behaviour: str) -> None:
    # RFC 5452 §9.1: source, ID and question must match; the right reply is still used.
    fake.behaviours["spoof.test."] = behaviour
    query = make_query("spoof.test.")
    reply = ask(forward(fake.address), query)
    message = as_dns(query, reply)
    assert [str(rr) for rr in message.answer[0]] == ["192.0.2.1"]
    assert "203.0.113.66" not in message.to_text()


def test_truncated_udp_is_retried_over_tcp(fake: FakeUpstream) -> None:
    fake.behaviours["tc.test."] = "truncate"
    reply = ask(forward(fake.address), make_query("tc.test."))
    assert reply.rcode == NOERROR and reply.packed is not None and reply.packed.ancount == 1
    assert fake.log == [("tc.test.", "A", "udp"), ("tc.test.", "A", "tcp")]


def test_big_answer_arrives_whole_and_is_truncated_for_a_small_client(fake: FakeUpstream) -> None:
    fake.behaviours["big.test."] = "big"
    query = make_query("big.test.")
    reply = ask(forward(fake.address), query)
    assert reply.packed is not None and reply.packed.ancount == 30
    small = dns.message.from_wire(encode_reply(query, reply, 512, True))
    assert small.flags & dns.flags.TC and small.question and not small.answer


@pytest.mark.parametrize("behaviour", ["drop", "servfail", "refused", "garbage"])
def test_failover_to_the_next_upstream(behaviour: str) -> None:
    with fake_upstream() as bad, fake_upstream() as good:
        bad.default = behaviour
        started = time.monotonic()
        reply = ask(forward(bad.address, good.address, timeout=0.3), make_query("x.test."))
        assert reply.rcode == NOERROR
        assert bad.names() == ["x.test."] and good.names() == ["x.test."]
        assert time.monotonic() - started < 1.0


def test_all_upstreams_down_is_servfail_with_ede_within_the_bound() -> None:
    with fake_upstream() as one, fake_upstream() as two:
        one.default = two.default = "drop"
        stage = forward(one.address, two.address, timeout=0.2, total_timeout=0.5)
        query = make_query("x.test.", edns=True)
        started = time.monotonic()
        reply = ask(stage, query)
        elapsed = time.monotonic() - started
    # A resolution failure: the cache may keep it briefly (RFC 9520 §3.2).
    assert reply.rcode == SERVFAIL and reply.cacheable
    assert elapsed < 0.5 + 0.2, elapsed
    message = as_dns(query, reply)
    (ede,) = [o for o in message.options if o.otype == dns.edns.EDE]
    assert ede.code == EDE_NO_REACHABLE_AUTHORITY and ede.text == UNREACHABLE_TEXT


def test_total_timeout_bounds_a_slow_upstream(fake: FakeUpstream) -> None:
    fake.default, fake.delay = "delay", 5.0
    started = time.monotonic()
    reply = ask(forward(fake.address, timeout=2.0, total_timeout=0.4), make_query("slow.test."))
    assert reply.rcode == SERVFAIL and time.monotonic() - started < 0.8


def test_failing_upstream_is_marked_down_and_skipped(fake: FakeUpstream) -> None:
    with fake_upstream() as good:
        fake.default = "servfail"
        stage = forward(fake.address, good.address)

        async def run() -> None:
            await stage.start()
            for i in range(5):
                await stage.handle(make_query(f"n{i}.test."), _no_next)
            await stage.stop()

        asyncio.run(run())
        # Three failures in a row mark it down; later queries go straight to the good one.
        assert len(fake.log) == 3 and len(good.log) == 5
        assert stage.states[0].down_until > 0


def test_fastest_policy_prefers_the_lower_rtt() -> None:
    with fake_upstream() as slow, fake_upstream() as fast:
        slow.default, slow.delay = "delay", 0.05
        stage = forward(slow.address, fast.address, policy="fastest")
        stage.states[0].srtt, stage.states[1].srtt = 0.05, 0.001
        ask(stage, make_query("f.test."))
        assert fast.names() == ["f.test."] and slow.names() == []


def test_do_and_cd_bits_pass_through(fake: FakeUpstream) -> None:
    query = make_query("x.test.")
    query.edns = Edns(1232, 0, True)
    query.flags |= 0x0010  # CD
    seen: list[bytes] = []

    async def exchange(upstream: Upstream, message: bytes, end: int, timeout: float) -> bytes:
        seen.append(message)
        request = dns.message.from_wire(message)
        return dns.message.make_response(request).to_wire()  # type: ignore[no-any-return]

    stage = ForwardStage("forward:t", [Upstream("127.0.0.1", 9)], exchange_udp_=exchange)
    ask(stage, query)
    request = dns.message.from_wire(seen[0])
    assert request.flags & dns.flags.CD and request.ednsflags & dns.flags.DO
    assert request.id != query.msg_id or len(seen) == 1  # random ID, not the client's


def test_loop_probe_detects_an_upstream_that_forwards_to_us() -> None:
    guard = LoopGuard()

    async def exchange(upstream: Upstream, message: bytes, end: int, timeout: float) -> bytes:
        # This "upstream" sends every query back to us: the edge sees the probe arrive.
        request = dns.message.from_wire(message)
        guard.arrived(request.question[0].name.to_text().lower())
        return dns.message.make_response(request).to_wire()  # type: ignore[no-any-return]

    stage = ForwardStage("forward:t", [Upstream("127.0.0.1", 9)], guard=guard, exchange_udp_=exchange)
    asyncio.run(stage.probe_loops())
    assert stage.states[0].disabled.startswith("forwarding loop")
    assert guard.probes == {}
    reply = ask(stage, make_query("x.test."))
    assert reply.rcode == SERVFAIL and reply.ede is not None


# Real upstreams ---------------------------------------------------------------


def test_real_dnsmasq_and_unbound_answer_through_forward(tmp_path: Path) -> None:
    with dnsmasq(tmp_path) as masq, unbound(tmp_path) as ub:
        for peer, name, expected in (
            (masq, "x.wild.lab.test.", "100.64.0.99"),
            (ub, "beta.lab.test.", "100.64.0.12"),
        ):
            query = make_query(name, edns=True)
            reply = ask(forward(peer.address), query)
            message = as_dns(query, reply)
            assert [str(rr) for rr in message.answer[0]] == [expected]
        # unbound refuses what it has no data for: the forwarder moves on, then SERVFAIL;
        # what the upstream did is in the trace, not in the client's EDE text.
        query = make_query("outside.example.")
        query.trace = []
        reply = ask(forward(ub.address, timeout=0.5), query)
        assert reply.rcode == SERVFAIL and reply.ede == (EDE_NO_REACHABLE_AUTHORITY, UNREACHABLE_TEXT)
        assert any("REFUSED" in line for line in query.trace)


def test_dns_over_tls_to_real_unbound(tmp_path: Path) -> None:
    with unbound(tmp_path, tls_name="dot.lab.test") as ub:
        cert = tmp_path / "dot.lab.test.pem"
        good = forward(f"tls://127.0.0.1:{ub.tls_port}#dot.lab.test", tls_ca=str(cert))

        async def run() -> list[Reply]:
            await good.start()
            try:
                # Pipelined on one connection: all at once.
                return await asyncio.gather(
                    *(good.handle(make_query(n), _no_next) for n in ["alpha.lab.test.", "beta.lab.test."] * 5)
                )
            finally:
                await good.stop()

        replies = asyncio.run(run())
        assert all(r.rcode == NOERROR and r.packed and r.packed.ancount == 1 for r in replies)
        assert good._tls is None or not good._tls.connections  # closed on stop
        # Wrong name: verification fails with a clear reason, and the query SERVFAILs.
        bad = forward(f"tls://127.0.0.1:{ub.tls_port}#wrong.name", tls_ca=str(cert), timeout=1.0)
        query = make_query("alpha.lab.test.")
        query.trace = []
        reply = ask(bad, query)
        assert reply.rcode == SERVFAIL and reply.ede == (EDE_NO_REACHABLE_AUTHORITY, UNREACHABLE_TEXT)
        trace = "\n".join(query.trace).lower()
        assert "certificate verify failed" in trace or "hostname" in trace


# Through the server process: fallback and the embedded-default shape ------------


FALLBACK_RULES = r"""
zones:
  mydomain.tld:
    fallback: {{zone: "."}}
    stages:
      - template:
          name: inside
          type: [A]
          match: ['^inside\.mydomain\.tld\.$']
          answer: ['{{{{ name }}}} 60 IN A 100.64.0.2']
      - template:
          name: gone
          match: ['^gone\.mydomain\.tld\.$']
          rcode: NXDOMAIN
  .:
    stages:
      - cache: {{}}
      - forward: {{upstreams: ["{upstream}"], timeout: 0.5}}
"""


def test_fallback_forwards_the_original_query_only_when_local_stages_fail(tmp_path: Path) -> None:
    with fake_upstream() as fake:
        server = start_server(tmp_path, FALLBACK_RULES.format(upstream=fake.address))
        try:

            def q(name: str) -> dns.message.Message:
                return dns.query.udp(
                    dns.message.make_query(name, "A"), server.host, port=server.port, timeout=3
                )

            def asked() -> list[str]:  # what clients caused, without the start-up loop probe
                return [n for n in fake.names() if not n.endswith("horizon-dns-loop-probe.")]

            inside = q("inside.mydomain.tld")
            assert [str(rr) for rr in inside.answer[0]] == ["100.64.0.2"]
            assert asked() == []  # the template answered: upstream never asked
            gone = q("Gone.MyDomain.tld")
            assert gone.rcode() == dns.rcode.NOERROR and [str(rr) for rr in gone.answer[0]] == ["192.0.2.1"]
            # ... and no stage matched at all (end of chain SERVFAIL) -> upstream too.
            other = q("other.mydomain.tld")
            assert [str(rr) for rr in other.answer[0]] == ["192.0.2.1"]
            assert asked() == ["gone.mydomain.tld.", "other.mydomain.tld."]
            # A name outside our zones goes to "." directly; a repeat comes from the cache.
            for _ in range(3):
                assert q("example.org").answer
            assert asked().count("example.org.") == 1
        finally:
            assert server.stop() == 0
        assert "Traceback" not in server.log_text()


def test_forwarding_loop_through_real_dnsmasq_is_detected(tmp_path: Path) -> None:
    from peers import free_port

    port = free_port()
    with dnsmasq(tmp_path, forward={"": f"127.0.0.1#{port}"}) as masq:
        rules = f"""
        zones:
          .:
            stages:
              - forward: {{upstreams: ["{masq.address}"], timeout: 0.5}}
        """
        (tmp_path / "srv").mkdir()
        server = start_server(tmp_path / "srv", rules, ipv6=False, port=port)
        try:
            deadline = time.monotonic() + 5
            while "forwards back to this server" not in server.log_text() and time.monotonic() < deadline:
                time.sleep(0.05)  # the probe runs in the background after start-up
            assert "forwards back to this server (a loop)" in server.log_text()
            started = time.monotonic()
            reply = dns.query.udp(
                dns.message.make_query("x.example", "A"), server.host, port=server.port, timeout=3
            )
            assert reply.rcode() == dns.rcode.SERVFAIL and time.monotonic() - started < 0.5
        finally:
            server.stop()


def test_servfail_and_nxdomain_from_upstream_are_distinct(fake: FakeUpstream) -> None:
    fake.behaviours["nx.test."] = "nxdomain"
    reply = ask(forward(fake.address), make_query("nx.test."))
    assert reply.rcode == NXDOMAIN and reply.outcome is Outcome.NXDOMAIN
    assert reply.packed is not None and reply.packed.negative_ttl() == 5


def test_outstanding_upstream_queries_are_capped() -> None:
    with fake_upstream() as slow:
        slow.default, slow.delay = "delay", 0.3
        stage = forward(slow.address, max_outstanding=3, timeout=1.0)

        async def flood() -> list[Reply]:
            await stage.start()
            try:
                asks = [stage.handle(make_query(f"q{i}.test."), _no_next) for i in range(10)]
                return await asyncio.gather(*asks)
            finally:
                await stage.stop()

        replies = asyncio.run(flood())
    assert sum(r.rcode == NOERROR for r in replies) == 3 and stage.shed == 7
    assert all(r.reason == "forward:test:overloaded" for r in replies if r.rcode == SERVFAIL)
