"""Hardening: access control, rate limiting, resource caps, and faults that must not lose queries."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from conftest import SEED_RULES, start_server
from fakeupstream import fake_upstream
from helpers import config_from, udp_exchange

from horizon_dns.config.schema import ListenAddress
from horizon_dns.core.access import Acl, EdgePolicy, RateLimiter
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.wire import REFUSED, short_reply
from horizon_dns.errors import ConfigError
from horizon_dns.net.server import DnsServer
from horizon_dns.net.tcp import TcpLimits


def test_non_loopback_listen_needs_an_allow_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(tmp_path, SEED_RULES, "listen: ['0.0.0.0:53']\n")
    (issue,) = [i for i in info.value.issues if "not a loopback address" in i.message]
    assert "100.64.0.0/10" in issue.hint and "fd7a:115c:a1e0::/48" in issue.hint
    config = config_from(
        tmp_path, SEED_RULES, "listen: [{address: '100.64.0.1:53', allow: [100.64.0.0/10]}, '127.0.0.1:53']\n"
    )
    assert config.listen[0].allow == ("100.64.0.0/10",)
    assert config.listen[1].allow == ("127.0.0.0/8", "::1/128")


def test_acl_and_rate_limiter() -> None:
    acl = Acl(["100.64.0.0/10", "fd7a:115c:a1e0::/48"])
    assert acl.allows("100.64.0.5") and acl.allows("fd7a:115c:a1e0::9") and acl.allows("::ffff:100.64.0.5")
    assert not acl.allows("192.0.2.1") and not acl.allows("garbage")
    now = [0.0]
    limiter = RateLimiter(qps=10, burst=5, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(7)] == [True] * 5 + [False, False]
    assert limiter.allow("b")  # buckets are per client
    now[0] += 0.1  # one token back
    assert limiter.allow("a") and not limiter.allow("a")


def test_short_reply_keeps_id_and_question() -> None:
    query = dns.message.make_query("x.test", "A").to_wire()
    reply = dns.message.from_wire(short_reply(query, REFUSED) or b"")
    assert reply.rcode() == dns.rcode.REFUSED and reply.question[0].name.to_text() == "x.test."
    slip = dns.message.from_wire(short_reply(query, 0, truncated=True) or b"")
    assert slip.flags & dns.flags.TC and not slip.answer
    assert short_reply(query[:14], REFUSED) is None


def _serve(
    tmp_path: Path, policy: EdgePolicy, allow: tuple[str, ...], batched: bool
) -> tuple[DnsServer, QueryHandler]:
    config = config_from(tmp_path, SEED_RULES)
    handler = QueryHandler(config.pipeline())
    listen = [ListenAddress("127.0.0.1", 0, allow)]
    server = DnsServer(handler, listen, TcpLimits(), policy, batched=batched)
    return server, handler


#: Both UDP listeners: recvmmsg/sendmmsg batches (Linux) and the portable asyncio protocol.
LISTENERS = pytest.mark.parametrize("batched", [True, False], ids=["mmsg", "asyncio"])


@LISTENERS
@pytest.mark.parametrize("refuse", ["silence", "refused"])
def test_clients_outside_the_allow_list_get_silence_or_refused(
    tmp_path: Path, refuse: str, batched: bool
) -> None:
    # The loopback client is "outside" an allow list that names only the overlay.
    server, _ = _serve(tmp_path, EdgePolicy(refuse_udp=refuse), ("100.64.0.0/10",), batched)

    async def scenario() -> tuple[bytes | None, bytes, int]:
        await server.start()
        try:
            port = server.bound[0].port
            wire = dns.message.make_query("nodeb.mydomain.tld", "A").to_wire()
            udp = await udp_exchange(port, wire, 0.5)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(struct.pack("!H", len(wire)) + wire)
            try:
                tcp = await asyncio.wait_for(reader.read(), 2.0)  # until the server closes
            except ConnectionResetError:
                tcp = b""
            writer.close()
            return udp, tcp, len(server.connections.open)
        finally:
            await server.stop(1)

    udp, tcp, counted = asyncio.run(scenario())
    if refuse == "silence":
        assert udp is None
    else:
        assert udp is not None and dns.message.from_wire(udp).rcode() == dns.rcode.REFUSED
    assert tcp == b"" and counted == 0  # over TCP: closed unread, never counted
    assert server.policy.refused == 2


@LISTENERS
def test_in_flight_cap_sheds_load_with_servfail(tmp_path: Path, batched: bool) -> None:
    with fake_upstream() as fake:
        fake.default, fake.delay = "delay", 1.0
        rules = f"""
        zones:
          .:
            stages:
              - forward: {{upstreams: ["{fake.address}"], timeout: 2}}
        """
        config = config_from(tmp_path, rules)
        handler = QueryHandler(config.pipeline())
        policy = EdgePolicy(max_inflight=5)
        server = DnsServer(handler, [ListenAddress("127.0.0.1", 0)], TcpLimits(), policy, batched=batched)

        async def scenario() -> list[bytes | None]:
            await config.pipeline().start()
            await server.start()
            try:
                port = server.bound[0].port
                queries = [dns.message.make_query(f"n{i}.test", "A").to_wire() for i in range(12)]
                asks = [udp_exchange(port, wire, 3.0) for wire in queries]
                return await asyncio.gather(*asks)
            finally:
                await server.stop(3)

        replies = asyncio.run(scenario())
    rcodes = sorted(dns.message.from_wire(r).rcode() for r in replies if r is not None)
    assert len(rcodes) == 12  # nobody is left without an answer
    assert rcodes.count(dns.rcode.SERVFAIL) == 7 and rcodes.count(dns.rcode.NOERROR) == 5
    assert policy.overloaded == 7


def test_loopback_is_not_rate_limited_but_counted_elsewhere(tmp_path: Path) -> None:
    server = start_server(tmp_path, SEED_RULES, "limits: {rate_qps: 1, rate_burst: 1}\n")
    try:
        for _ in range(20):  # the local stub may ask as fast as it likes
            reply = dns.query.udp(
                dns.message.make_query("nodeb.mydomain.tld", "A"), server.host, port=server.port, timeout=2
            )
            assert not reply.flags & dns.flags.TC
    finally:
        server.stop()


# Faults: every query answered (or a clean SERVFAIL), none lost, latency bounded. ------


@pytest.mark.parametrize("fault", ["drop", "delay", "garbage", "wrong-id"])
def test_upstream_faults_lose_no_query(tmp_path: Path, fault: str) -> None:
    with fake_upstream() as fake:
        fake.default, fake.delay = fault, 5.0
        rules = f"""
        zones:
          mydomain.tld:
            stages:
              - template: {{type: [A], answer: ['{{{{ name }}}} 60 IN A 100.64.0.1']}}
          .:
            stages:
              - forward: {{upstreams: ["{fake.address}"], timeout: 0.2, total_timeout: 0.4}}
        """
        server = start_server(tmp_path, rules, ipv6=False)
        try:
            started = time.monotonic()

            async def storm() -> list[dns.message.Message]:
                async def one(i: int) -> dns.message.Message:
                    name = f"x{i}.mydomain.tld" if i % 2 else f"x{i}.example"
                    query = dns.message.make_query(name, "A")
                    return await asyncio.wait_for(
                        asyncio.to_thread(dns.query.udp, query, server.host, port=server.port, timeout=3), 5
                    )

                return await asyncio.gather(*(one(i) for i in range(60)))

            replies = asyncio.run(storm())
            elapsed = time.monotonic() - started
            local = [r for i, r in enumerate(replies) if i % 2]
            remote = [r for i, r in enumerate(replies) if not i % 2]
            assert all(r.rcode() == dns.rcode.NOERROR for r in local)  # other queries keep being answered
            if fault == "wrong-id":
                assert all(r.rcode() == dns.rcode.NOERROR for r in remote)  # the right reply still wins
            else:
                assert all(r.rcode() == dns.rcode.SERVFAIL for r in remote)
            assert elapsed < 5
            print(f"\nfault {fault}: 60 queries, 0 lost, {elapsed:.2f} s")
        finally:
            assert server.stop() == 0
        assert "Traceback" not in server.log_text()
