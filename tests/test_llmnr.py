"""The LLMNR responder's decisions (RFC 4795), without sockets."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path

import dns.message
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horizon_dns.llmnr.responder import (
    C_BIT,
    LLMNR_GROUP_V4,
    LLMNR_GROUP_V6,
    T_BIT,
    Arrival,
    Interface,
    Names,
    build_query,
    decide,
    usable_response,
)

ETH0 = Interface(
    "eth0",
    2,
    (
        ipaddress.ip_interface("100.64.0.1/24"),
        ipaddress.ip_interface("fd7a:115c:a1e0::1/64"),
        ipaddress.ip_interface("fe80::64:ff:fe00:1/64"),
    ),
)
NAMES = Names(
    hostname="nodea",
    aliases=frozenset({"hub", "grafana"}),
    devices={"printer": (ipaddress.ip_address("100.64.0.22"), ipaddress.ip_address("fd7a:115c:a1e0::22"))},
)
MCAST = Arrival("udp", ("100.64.0.3", 40000), LLMNR_GROUP_V4, 2)


def ask(
    name: str, qtype: str = "A", arrival: Arrival = MCAST, names: Names = NAMES
) -> tuple[bytes | None, str]:
    return decide(build_query(7, name, dns.rdatatype.from_text(qtype)), arrival, names, ETH0)


def answers(reply: bytes | None) -> list[str]:
    assert reply is not None
    message = dns.message.from_wire(reply)
    return sorted(
        f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rr}" for rrset in message.answer for rr in rrset
    )


def test_hostname_and_aliases_get_the_arrival_interface_addresses() -> None:
    for name in ("nodea", "hub", "GraFana"):
        reply, reason = ask(name)
        assert reason == "answered"
        assert answers(reply) == [f"{name}. A 100.64.0.1"]
    reply, _ = ask("hub", "AAAA")
    assert answers(reply) == ["hub. AAAA fd7a:115c:a1e0::1", "hub. AAAA fe80::64:ff:fe00:1"]


def test_reply_header_echoes_id_and_question_with_ttl() -> None:
    reply, _ = ask("Hub", "ANY")
    assert reply is not None
    message = dns.message.from_wire(reply)
    assert message.id == 7 and message.flags & 0x8000 and not message.flags & (C_BIT | T_BIT)
    assert message.question[0].name.to_text() == "Hub."
    assert {rrset.ttl for rrset in message.answer} == {30}
    assert len(answers(reply)) == 3


def test_device_names_get_their_configured_addresses() -> None:
    assert answers(ask("printer", "A")[0]) == ["printer. A 100.64.0.22"]
    assert answers(ask("printer", "AAAA")[0]) == ["printer. AAAA fd7a:115c:a1e0::22"]


def test_owned_name_without_that_type_is_an_empty_answer() -> None:
    reply, reason = ask("hub", "MX")
    assert reason == "answered" and answers(reply) == []
    assert dns.message.from_wire(reply).rcode() == 0  # type: ignore[arg-type]


def test_ptr_for_own_addresses() -> None:
    reply, _ = ask("1.0.64.100.in-addr.arpa", "PTR")
    assert answers(reply) == ["1.0.64.100.in-addr.arpa. PTR nodea."]
    assert ask("9.0.64.100.in-addr.arpa", "PTR") == (None, "not-ours")


def test_ipv6_multicast_and_tcp_unicast_are_answered() -> None:
    v6 = Arrival("udp", ("fe80::64:ff:fe00:3%eth0", 40000), LLMNR_GROUP_V6, 2)
    assert ask("hub", arrival=v6)[1] == "answered"
    tcp = Arrival("tcp", ("100.64.0.3", 40000), "100.64.0.1", 2)
    assert ask("hub", arrival=tcp)[1] == "answered"


def test_conflicting_name_sets_the_t_bit() -> None:
    names = Names("nodea", frozenset({"hub"}), conflicts={"hub"})
    reply, _ = ask("hub", names=names)
    assert reply is not None and struct.unpack_from("!H", reply, 2)[0] & T_BIT
    reply, _ = ask("nodea", names=names)
    assert reply is not None and not struct.unpack_from("!H", reply, 2)[0] & T_BIT


def _with_flags(data: bytes, flags: int) -> bytes:
    return data[:2] + struct.pack("!H", flags) + data[4:]


def _with_counts(data: bytes, qd: int, an: int, ns: int) -> bytes:
    return data[:4] + struct.pack("!HHH", qd, an, ns) + data[10:]


QUERY = build_query(7, "hub", 1)


@pytest.mark.parametrize(
    ("data", "arrival", "reason"),
    [
        (QUERY[:11], MCAST, "short"),
        (_with_flags(QUERY, 0x8000), MCAST, "response"),
        (_with_flags(QUERY, 0x2800), MCAST, "opcode"),
        (_with_counts(QUERY, 2, 0, 0), MCAST, "counts"),
        (_with_counts(QUERY, 1, 1, 0), MCAST, "counts"),
        (_with_counts(QUERY, 1, 0, 1), MCAST, "counts"),
        (_with_flags(QUERY, C_BIT), MCAST, "conflict-bit"),
        # RFC 4795 §2.4: unicast UDP queries are silently discarded.
        (QUERY, Arrival("udp", ("100.64.0.3", 40000), "100.64.0.1", 2), "unicast-udp"),
        # §2.5: only on-link senders.
        (QUERY, Arrival("udp", ("198.51.100.9", 40000), LLMNR_GROUP_V4, 2), "off-link"),
        (QUERY, Arrival("udp", ("2001:db8::9", 40000), LLMNR_GROUP_V6, 2), "off-link"),
        (build_query(7, "nosuchname", 1), MCAST, "not-ours"),
        (QUERY[:-3], MCAST, "malformed"),
    ],
)
def test_discard_rules(data: bytes, arrival: Arrival, reason: str) -> None:
    assert decide(data, arrival, NAMES, ETH0) == (None, reason)


def test_query_on_an_unserved_interface_is_ignored() -> None:
    assert decide(QUERY, MCAST, NAMES, None) == (None, "interface")


def test_chaos_class_is_not_ours() -> None:
    data = QUERY[:-2] + struct.pack("!H", 3)
    assert decide(data, MCAST, NAMES, ETH0) == (None, "not-ours")


arrivals = st.sampled_from(
    [
        MCAST,
        Arrival("udp", ("fe80::1", 5355), LLMNR_GROUP_V6, 2),
        Arrival("tcp", ("100.64.0.9", 1234), "100.64.0.1", 2),
        Arrival("udp", ("100.64.0.3", 1), "100.64.0.1", 2),
        Arrival("udp", ("8.8.8.8", 1), LLMNR_GROUP_V4, 2),
    ]
)


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=300), arrival=arrivals)
def test_arbitrary_packets_never_raise_and_ignored_ones_get_no_reply(data: bytes, arrival: Arrival) -> None:
    reply, reason = decide(data, arrival, NAMES, ETH0)
    if reply is not None:
        assert reason == "answered"
        flags = struct.unpack_from("!H", data, 2)[0]
        qd, an, ns = struct.unpack_from("!HHH", data, 4)
        # Never a reply to what the RFC says to ignore.
        assert not flags & 0x8000 and not flags & 0x7800 and not flags & C_BIT
        assert (qd, an, ns) == (1, 0, 0)
        assert arrival.transport == "tcp" or arrival.destination in (LLMNR_GROUP_V4, LLMNR_GROUP_V6)
        assert reply[:2] == data[:2]


@settings(max_examples=500, deadline=None)
@given(
    name=st.sampled_from(["hub", "nodea", "printer", "grafana", "other", "HUB"]),
    flags=st.integers(0, 0xFFFF),
    qtype=st.sampled_from([1, 28, 255, 12, 15]),
)
def test_structured_queries_follow_the_rules(name: str, flags: int, qtype: int) -> None:
    data = _with_flags(build_query(9, name, qtype), flags)
    reply, reason = decide(data, MCAST, NAMES, ETH0)
    ignored = flags & (0x8000 | 0x7800 | C_BIT) or name == "other"
    assert (reply is None) == bool(ignored), reason


def test_a_configured_hostname_survives_the_rescan(tmp_path: Path) -> None:
    """Reported: the periodic rescan replaced llmnr.hostname with the system's name."""
    from helpers import config_from

    from horizon_dns.runtime import make_llmnr_responder

    config = config_from(tmp_path, "zones: {}\n", "llmnr: {hostname: LabHost, interfaces: [nosuch0]}\n")
    responder = make_llmnr_responder(config)
    assert responder is not None
    asyncio.run(responder.rescan())
    assert responder.names.hostname == "LabHost"
    # Without one, the system's hostname is followed as it changes.
    (tmp_path / "b").mkdir()
    plain = config_from(tmp_path / "b", "zones: {}\n", "llmnr: {interfaces: [nosuch0]}\n")
    follower = make_llmnr_responder(plain)
    assert follower is not None and follower.follow_hostname


def test_a_sender_uses_only_plain_answers() -> None:
    """RFC 4795 §2.1.1 and §4.1: one question, RCODE 0, not tentative."""
    query = build_query(7, "hub", 1)
    reply = bytearray(query)
    reply[2] |= 0x80  # QR
    assert usable_response(bytes(reply))
    tentative = bytearray(reply)
    tentative[2] |= 0x01  # T
    failed = bytearray(reply)
    failed[3] |= 0x02  # SERVFAIL
    no_question = bytearray(reply[:12])
    no_question[4:6] = b"\x00\x00"
    for bad in (tentative, failed, no_question, reply[:5]):
        assert not usable_response(bytes(bad))


def test_llmnr_tcp_leaves_with_ttl_1_from_the_handshake_on() -> None:
    """RFC 4795 §2.5: the listener's TTL is inherited by every connection, SYN-ACK included."""
    from horizon_dns.net.llmnr import _tcp_listener

    listener = _tcp_listener(ipaddress.ip_address("127.0.0.1"), 0)
    client = socket.create_connection(listener.getsockname(), timeout=2)
    try:
        listener.setblocking(True)
        accepted, _peer = listener.accept()
        with accepted:
            assert listener.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 1
            assert accepted.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 1
    finally:
        client.close()
        listener.close()


def test_llmnr_tcp_keeps_answering_while_one_host_holds_80_trickling_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The DNS listener's TCP rules (per-host cap, message deadline, eviction) hold on 5355:
    one on-link host trickling 80 connections cannot keep another host's query out."""
    from horizon_dns.net import tcp
    from horizon_dns.net.llmnr import TCP_PER_HOST, LlmnrResponder, LlmnrTcpConnection, _tcp_listener

    # On-link hosts, played by loopback addresses the rules are told are not loopback.
    monkeypatch.setattr(tcp, "is_loopback", lambda ip: False)
    loopback = Interface("lo", 1, (ipaddress.ip_interface("127.0.0.1/8"),))
    responder = LlmnrResponder(NAMES, list)
    responder.interfaces = {1: loopback}

    async def scenario() -> tuple[float, dns.message.Message, int]:
        listener = _tcp_listener(ipaddress.ip_address("127.0.0.1"), 0)
        port = listener.getsockname()[1]
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: LlmnrTcpConnection(responder), sock=listener)
        try:
            trickler = ("127.0.0.2", 0)
            streams = [
                await asyncio.open_connection("127.0.0.1", port, local_addr=trickler) for _ in range(80)
            ]
            for _reader, writer in streams:
                writer.write(b"\xff\xff\x00")
                await writer.drain()
            started = asyncio.get_running_loop().time()
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
            query = build_query(9, "hub", 1)
            writer.write(struct.pack("!H", len(query)) + query)
            (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 1.0))
            answer = dns.message.from_wire(await reader.readexactly(length))
            took = asyncio.get_running_loop().time() - started
            held = responder.tcp_connections.per_client["127.0.0.2"]
            for _reader, other in [*streams, (reader, writer)]:
                other.close()
            return took, answer, held
        finally:
            server.close()
            for conn in list(responder.tcp_connections.open):
                conn.abort()

    took, answer, held = asyncio.run(scenario())
    assert took < 1.0 and [rr.to_text() for rr in answer.answer[0]] == ["127.0.0.1"]
    assert held <= TCP_PER_HOST and responder.tcp_connections.evicted > 0


def test_a_udp_reply_over_512_octets_is_truncated_with_tc() -> None:
    """RFC 4795 §2.1 (512 octets when in doubt) and §2.1.1 (TC: ask again over TCP)."""
    many = tuple(ipaddress.ip_address(f"100.64.1.{i}") for i in range(1, 61))
    names = Names("nodea", devices={"bigbox": many})
    reply, reason = ask("bigbox", names=names)
    assert reply is not None and reason == "truncated" and len(reply) <= 512
    message = dns.message.from_wire(reply)
    assert message.flags & 0x0200 and 0 < len(message.answer[0]) < 60
    tcp = Arrival("tcp", ("100.64.0.3", 40000), "100.64.0.1", 2)
    full, reason = ask("bigbox", arrival=tcp, names=names)
    assert full is not None and reason == "answered"
    assert not dns.message.from_wire(full).flags & 0x0200 and len(dns.message.from_wire(full).answer[0]) == 60
