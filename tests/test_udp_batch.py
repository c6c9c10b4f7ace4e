"""Batched UDP I/O (recvmmsg/sendmmsg): what arrives together is answered, each reply to its sender."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import pytest
from conftest import tools_required
from helpers import config_from, udp_exchange
from hypothesis import given
from hypothesis import strategies as st

from horizon_dns.config.schema import ListenAddress
from horizon_dns.core.access import EdgePolicy
from horizon_dns.core.handler import QueryHandler
from horizon_dns.net import mmsg, udp
from horizon_dns.net.server import DnsServer
from horizon_dns.net.tcp import TcpLimits
from horizon_dns.net.udp import BatchedUdpListener, UdpListener


@pytest.fixture(autouse=True)
def _needs_mmsg() -> None:
    if not mmsg.available():
        if tools_required():
            pytest.fail("recvmmsg/sendmmsg are not available -- CI forbids skipping", pytrace=False)
        pytest.skip("recvmmsg/sendmmsg need Linux with glibc")


FAMILIES = pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"]
)


def _bound(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


@FAMILIES
def test_a_batch_reads_many_datagrams_and_replies_to_each_sender(family: int, host: str) -> None:
    server = _bound(family, host)
    server.setblocking(False)
    clients = [_bound(family, host) for _ in range(3)]
    try:
        batch = mmsg.DatagramBatch(server, slots=8)
        sent = [(clients[i % 3], f"query {i}".encode()) for i in range(11)]
        for client, payload in sent:
            client.sendto(payload, server.getsockname())
        # Loopback delivers at once: the first call takes a full batch, the next the rest.
        first = [batch.message(i) for i in range(batch.receive())]
        second = [batch.message(i) for i in range(batch.receive())]
        assert batch.receive() == 0  # drained: EAGAIN is "nothing", not an error
        arrived = first + second
        assert [data for data, _ in arrived] == [payload for _, payload in sent]
        for (client, _), (_, name) in zip(sent, arrived, strict=True):
            assert mmsg.decode_address(name)[:2] == client.getsockname()[:2]
        # Replies to the second batch, queued out of order: each goes to its own sender.
        for i in reversed(range(len(second))):
            batch.queue(i, b"reply to " + second[i][0])
        assert batch.flush() == len(second) == 3
        for client, payload in sent[8:]:
            client.settimeout(2)
            assert client.recv(100) == b"reply to " + payload
    finally:
        for sock in (server, *clients):
            sock.close()


def test_a_reply_the_kernel_refuses_is_counted_and_the_rest_still_go() -> None:
    server = _bound(socket.AF_INET, "127.0.0.1")
    server.setblocking(False)
    client = _bound(socket.AF_INET, "127.0.0.1")
    client.settimeout(2)
    try:
        batch = mmsg.DatagramBatch(server, slots=4)
        for payload in (b"first", b"second"):
            client.sendto(payload, server.getsockname())
        assert batch.receive() == 2
        # Datagram 0's sender now reads as port 0: sendmmsg fails on that one (EINVAL).
        struct.pack_into("!H", batch.headers, _name_offset(batch, 0) + 2, 0)
        batch.queue(0, b"lost")
        batch.queue(1, b"reply")
        assert batch.flush() == 1 and batch.dropped == 1
        assert client.recv(100) == b"reply"
    finally:
        server.close()
        client.close()


def _name_offset(batch: mmsg.DatagramBatch, i: int) -> int:
    """Where datagram ``i``'s sender address sits in the batch's header mapping."""
    return batch.names_offset + i * mmsg.NAME_BYTES


def test_flush_with_nothing_queued_sends_nothing() -> None:
    server = _bound(socket.AF_INET, "127.0.0.1")
    try:
        assert mmsg.DatagramBatch(server, slots=4).flush() == 0
    finally:
        server.close()


@given(st.ip_addresses(), st.integers(0, 65535), st.integers(0, 2**20 - 1), st.integers(0, 2**32 - 1))
def test_decode_address_reads_sockaddr_in_and_in6(
    address: object, port: int, flowinfo: int, scope_id: int
) -> None:
    packed = address.packed  # type: ignore[attr-defined]
    if address.version == 4:  # type: ignore[attr-defined]
        raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + packed + bytes(8)
        assert mmsg.decode_address(raw) == (str(address), port)
    else:
        raw = (
            struct.pack("=H", socket.AF_INET6)
            + struct.pack("!HI", port, flowinfo)
            + packed
            + struct.pack("=I", scope_id)
        )
        host, *rest = mmsg.decode_address(raw)
        # inet_ntop and ipaddress may spell an address differently (::ffff:0.0.0.0).
        assert ipaddress.ip_address(host) == address and rest == [port, flowinfo, scope_id]


def test_decode_address_rejects_other_families() -> None:
    with pytest.raises(ValueError, match="not IP"):
        mmsg.decode_address(struct.pack("=H", socket.AF_UNIX) + bytes(14))


RULES = r"""
zones:
  mydomain.tld:
    stages:
      - cache: {}
      - template:
          type: [A]
          match: ['^n(?P<n>\d+)\.mydomain\.tld\.$']
          answer: ['{{ name }} 60 IN A 100.64.0.{{ group.n }}']
"""


@pytest.mark.parametrize("batched", [True, False], ids=["mmsg", "asyncio"])
@FAMILIES
def test_a_burst_mixing_cached_and_new_names_is_answered_in_full(
    tmp_path: Path, family: int, host: str, batched: bool
) -> None:
    """More datagrams than a batch holds, arriving at once: hot-path hits and full-path
    misses in the same batches; every query gets its own answer back."""
    config = config_from(tmp_path, RULES)
    handler = QueryHandler(config.pipeline())
    server = DnsServer(handler, [ListenAddress(host, 0)], TcpLimits(), batched=batched)
    count = 150  # over two 64-slot batches; small enough for the default receive buffer

    async def scenario() -> tuple[type, dict[int, dns.message.Message]]:
        await server.start()
        listener = type(server.udp[0][1])
        loop = asyncio.get_running_loop()
        client = socket.socket(family, socket.SOCK_DGRAM)
        client.setblocking(False)
        try:
            address = (host, server.bound[0].port)
            warm = dns.message.make_query("n1.mydomain.tld", "A")
            client.sendto(warm.to_wire(), address)
            await asyncio.wait_for(loop.sock_recv(client, 512), 3)  # n1 is now cached
            queries = {}
            for i in range(count):  # no await in between: they queue up in the socket
                query = dns.message.make_query(f"n{1 if i % 2 else i % 250}.mydomain.tld", "A")
                query.id = i
                queries[i] = query
                client.sendto(query.to_wire(), address)
            replies: dict[int, dns.message.Message] = {}
            while len(replies) < count:
                reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(client, 512), 3))
                assert reply.id not in replies
                replies[reply.id] = reply
            return listener, replies
        finally:
            client.close()
            await server.stop(1)

    listener, replies = asyncio.run(scenario())
    assert listener is (BatchedUdpListener if batched else UdpListener)
    for i, reply in replies.items():
        n = 1 if i % 2 else i % 250
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.question[0].name.to_text() == f"n{n}.mydomain.tld."
        assert [r.address for r in reply.answer[0]] == [f"100.64.0.{n}"]
    assert handler.hot_hits >= count // 2 - 1  # the odd ones came from the hot path


def test_a_datagram_that_breaks_the_listener_costs_only_itself(tmp_path: Path) -> None:
    config = config_from(tmp_path, RULES)
    handler = QueryHandler(config.pipeline())
    hot_answer = handler.hot_answer

    def breaks_on_n13(data: bytes, tcp: bool = False) -> bytes | None:
        if b"\x03n13" in data:
            raise RuntimeError("a bug")
        return hot_answer(data, tcp)

    handler.hot_answer = breaks_on_n13  # type: ignore[method-assign]
    server = DnsServer(handler, [ListenAddress("127.0.0.1", 0)], TcpLimits(), batched=True)

    async def scenario() -> set[int]:
        await server.start()
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        try:
            address = ("127.0.0.1", server.bound[0].port)
            for n in (12, 13, 14):  # one batch: queued before the server reads
                query = dns.message.make_query(f"n{n}.mydomain.tld", "A")
                query.id = n
                client.sendto(query.to_wire(), address)
            ids = set()
            for _ in range(2):
                ids.add(dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(client, 512), 3)).id)
            with pytest.raises(TimeoutError):  # n13 gets no reply; nothing else is missing
                await asyncio.wait_for(loop.sock_recv(client, 512), 0.3)
            return ids
        finally:
            client.close()
            await server.stop(1)

    assert asyncio.run(scenario()) == {12, 14}


@pytest.mark.parametrize("batched", [True, False], ids=["mmsg", "asyncio"])
def test_a_remembered_reply_still_obeys_the_allow_list_and_shutdown(tmp_path: Path, batched: bool) -> None:
    # The batched listener answers a loopback client's repeated question from the
    # reply memo before anything else; the allow list (changed by a reload) and a
    # stop must still close that door.
    config = config_from(tmp_path, RULES)
    handler = QueryHandler(config.pipeline())
    allowed = ListenAddress("127.0.0.1", 0, ("127.0.0.0/8",))
    server = DnsServer(handler, [allowed], TcpLimits(), batched=batched)
    wire = dns.message.make_query("n1.mydomain.tld", "A").to_wire()

    async def scenario() -> tuple[bytes | None, bytes | None, bytes | None]:
        await server.start()
        port = server.bound[0].port
        try:
            await udp_exchange(port, wire, 1.0)  # cached, then remembered
            remembered = await udp_exchange(port, wire, 1.0)
            server.acls[0].update(["100.64.0.0/10"])  # what a reload of `allow` does
            refused = await udp_exchange(port, wire, 0.3)
            server.acls[0].update(["127.0.0.0/8"])
            for _transport, protocol in server.udp:
                protocol.accepting = False  # what stop() does first
            stopping = await udp_exchange(port, wire, 0.3)
            return remembered, refused, stopping
        finally:
            await server.stop(1)

    remembered, refused, stopping = asyncio.run(scenario())
    assert remembered is not None and dns.message.from_wire(remembered).answer
    assert handler.hot_hits >= 1
    assert refused is None and stopping is None


@pytest.mark.parametrize("batched", [True, False], ids=["mmsg", "asyncio"])
def test_a_client_off_loopback_is_rate_limited_before_its_remembered_reply(
    tmp_path: Path, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only loopback clients skip the rate limiter. Tests may send only to loopback,
    # so the listener is told that no address is: with one token a second, the
    # second question gets the TC=1 slip although its reply is remembered.
    monkeypatch.setattr(udp, "is_loopback", lambda ip: False)
    config = config_from(tmp_path, RULES)
    handler = QueryHandler(config.pipeline())
    policy = EdgePolicy(rate_qps=1, rate_burst=1)
    server = DnsServer(handler, [ListenAddress("127.0.0.1", 0)], TcpLimits(), policy, batched=batched)
    wire = dns.message.make_query("n1.mydomain.tld", "A").to_wire()

    async def scenario() -> list[bytes | None]:
        await server.start()
        try:
            await handler.handle(wire, None, "udp")
            assert handler.hot_answer(wire) is not None  # remembered from now on
            return [await udp_exchange(server.bound[0].port, wire, 1.0) for _ in range(2)]
        finally:
            await server.stop(1)

    first, second = (dns.message.from_wire(r) for r in asyncio.run(scenario()) if r is not None)
    assert first.answer and not first.flags & dns.flags.TC
    assert second.flags & dns.flags.TC and not second.answer
    assert policy.limiter.limited == 1
