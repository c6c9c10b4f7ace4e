"""Integration tests: real DNS clients (dnspython, dig, kdig, raw sockets) against a running server.

Every packet goes to a server these tests started on 127.0.0.1 or ::1; every wait is
bounded by a socket timeout or a subprocess timeout.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from conftest import SEED_RULES, ServerProcess, require_tool, start_server, stopped_cleanly
from fakeupstream import fake_upstream
from helpers import tcp_read

TIMEOUT = 3.0  # seconds for any one reply
HEADER = struct.Struct("!HHHHHH")
QR, AA, TC, RD, RA, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010

CHAIN_NAME = "WwW.NoDeB.MyDoMaIn.TlD."  # 0x20 mixed case: must come back exactly like this
CHAIN_DATA = {"A": "100.64.0.2", "AAAA": "fd7a:115c:a1e0::2"}
BIG_NAME = "x.big.test."
BIG_COUNT = 40

TRANSPORTS = ["udp", "tcp"]
FAMILIES = ["ipv4", "ipv6"]


# Helpers ------------------------------------------------------------------------


def where(server: ServerProcess, family: str = "ipv4") -> tuple[str, int]:
    if family == "ipv6":
        assert server.host6 is not None and server.port6 is not None, "server has no IPv6 listener"
        return server.host6, server.port6
    return server.host, server.port


def ask(
    server: ServerProcess, query: dns.message.Message, transport: str, family: str = "ipv4"
) -> dns.message.Message:
    host, port = where(server, family)
    if transport == "udp":
        return dns.query.udp(query, host, port=port, timeout=TIMEOUT)
    return dns.query.tcp(query, host, port=port, timeout=TIMEOUT)


def connect(host: str, port: int, timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def udp_raw(host: str, port: int, data: bytes, timeout: float = TIMEOUT) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, (host, port))
        reply, _peer = sock.recvfrom(65535)
        return reply


def framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def tcp_raw(host: str, port: int, data: bytes) -> bytes:
    with connect(host, port) as sock:
        sock.sendall(framed(data))
        return tcp_read(sock)


def raw(server: ServerProcess, data: bytes, transport: str, family: str = "ipv4") -> bytes:
    host, port = where(server, family)
    return udp_raw(host, port, data) if transport == "udp" else tcp_raw(host, port, data)


def header(reply: bytes) -> tuple[int, int, int, int, int, int]:
    assert len(reply) >= HEADER.size, reply
    return HEADER.unpack_from(reply)


def question_bytes(query: bytes) -> bytes:
    """The question section of a one-question message built without compression."""
    end = HEADER.size
    while query[end]:
        end += 1 + query[end]
    return query[HEADER.size : end + 5]


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closed (EOF or reset); socket.timeout propagates as a failure."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ConnectionAbortedError):
        return True


def peer_closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock``; fails when it stays open beyond ``limit``."""
    sock.settimeout(limit)
    start = time.monotonic()
    try:
        closed = closed_by_peer(sock)
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {limit} s")
    assert closed, "the server sent data instead of closing"
    return time.monotonic() - start


def rrsets(message: dns.message.Message) -> list[tuple[str, str, list[str]]]:
    return [
        (
            str(rrset.name).lower(),
            dns.rdatatype.to_text(rrset.rdtype),
            sorted(r.to_text().lower() for r in rrset),
        )
        for rrset in message.answer
    ]


# dnspython: answers, flags, negative answers ----------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("qtype", ["A", "AAAA"])
def test_cname_chain_in_one_reply(
    seed_server: ServerProcess, transport: str, family: str, qtype: str
) -> None:
    query = dns.message.make_query(CHAIN_NAME, qtype)
    query.id = 0x4A5B
    reply = ask(seed_server, query, transport, family)
    assert reply.id == 0x4A5B
    assert reply.rcode() == dns.rcode.NOERROR
    # RFC 1035 §7.3 / dns0x20: the question comes back with the client's letter case.
    assert len(reply.question) == 1
    assert reply.question[0].name.to_text() == CHAIN_NAME
    assert dns.rdatatype.to_text(reply.question[0].rdtype) == qtype
    assert reply.flags & dns.flags.QR
    assert reply.flags & dns.flags.AA, "templates answer authoritatively"
    assert not reply.flags & dns.flags.RA, "no forwarding stage: recursion is not available"
    assert reply.flags & dns.flags.RD, "RD is copied from the query"
    # RFC 1034 §4.3.2 step 3a: the CNAME first, then the target's records, in one reply.
    assert rrsets(reply) == [
        ("www.nodeb.mydomain.tld.", "CNAME", ["nodeb.mydomain.tld."]),
        ("nodeb.mydomain.tld.", qtype, [CHAIN_DATA[qtype]]),
    ]
    assert reply.authority == []


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("flags", "expect"), [(0, 0), (RD, RD), (RD | CD, RD | CD), (CD, CD)])
def test_rd_and_cd_copied(seed_server: ServerProcess, transport: str, flags: int, expect: int) -> None:
    query = dns.message.make_query("nodeb.mydomain.tld.", "A")
    query.flags = flags
    reply = ask(seed_server, query, transport)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & (RD | CD) == expect
    assert not reply.flags & dns.flags.RA


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nodata_is_noerror_with_soa(seed_server: ServerProcess, transport: str, family: str) -> None:
    reply = ask(seed_server, dns.message.make_query("nodeb.mydomain.tld.", "MX"), transport, family)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer == []
    assert reply.flags & dns.flags.AA
    # RFC 2308 §2.2: NODATA carries the zone's SOA in the authority section.
    assert len(reply.authority) == 1
    soa = reply.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text("mydomain.tld.")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_outside_every_zone_is_refused(seed_server: ServerProcess, transport: str, family: str) -> None:
    query = dns.message.make_query("example.org.", "A")
    reply = ask(seed_server, query, transport, family)
    assert reply.id == query.id
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.answer == [] and reply.authority == []
    assert reply.question[0].name == dns.name.from_text("example.org.")
    assert not reply.flags & dns.flags.RA


# EDNS ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("do", [False, True])
@pytest.mark.parametrize("payload", [512, 1232, 4096])
def test_edns_reply_has_opt(seed_server: ServerProcess, transport: str, do: bool, payload: int) -> None:
    query = dns.message.make_query("nodeb.mydomain.tld.", "A", use_edns=0, payload=payload, want_dnssec=do)
    reply = ask(seed_server, query, transport)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.opt is not None, "RFC 6891 §7: a query with OPT gets a reply with OPT"
    assert reply.edns == 0
    assert reply.payload == 1232
    # RFC 3225 §3: the DO bit is copied into the response.
    assert bool(reply.ednsflags & dns.flags.DO) == do
    assert [r.to_text() for r in reply.answer[0]] == ["100.64.0.2"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_edns_no_opt(seed_server: ServerProcess, transport: str) -> None:
    query = dns.message.make_query(CHAIN_NAME, "A", use_edns=False)
    reply = ask(seed_server, query, transport)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.opt is None and reply.edns == -1
    assert len(reply.answer) == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refused_with_edns_carries_ede(seed_server: ServerProcess, transport: str) -> None:
    reply = ask(seed_server, dns.message.make_query("example.org.", "A", use_edns=0), transport)
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.edns == 0
    ede = [o for o in reply.options if o.otype == dns.edns.EDE]
    assert ede and ede[0].code == 20  # RFC 8914 §4.21 Not Authoritative


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", [1, 255])
def test_unknown_edns_version_is_badvers(seed_server: ServerProcess, transport: str, version: int) -> None:
    query = dns.message.make_query("nodeb.mydomain.tld.", "A", use_edns=version)
    reply = ask(seed_server, query, transport)
    # RFC 6891 §6.1.3: BADVERS (16, extended rcode) with an OPT of the version we speak.
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.opt is not None and reply.edns == 0
    assert reply.answer == []
    assert reply.question[0].name == dns.name.from_text("nodeb.mydomain.tld.")


def test_badvers_wire_encoding(seed_server: ServerProcess) -> None:
    """BADVERS = 16: 0 in the header's 4 bits, 1 in the OPT TTL's top byte (RFC 6891 §6.1.3)."""
    query = dns.message.make_query("nodeb.mydomain.tld.", "A", use_edns=1).to_wire()
    reply = raw(seed_server, query, "udp")
    _id, flags, qd, an, ns, ar = header(reply)
    assert flags & 0xF == 0
    assert (qd, an, ns, ar) == (1, 0, 0, 1)
    opt = reply[HEADER.size + len(question_bytes(query)) :]
    assert opt[0] == 0, "OPT owner is the root"
    rtype, payload, ttl, _rdlength = struct.unpack_from("!HHIH", opt, 1)
    assert rtype == 41 and payload == 1232
    assert ttl >> 24 == 1, "upper 8 bits of the 12-bit rcode"
    assert (ttl >> 16) & 0xFF == 0, "version 0"


# Truncation ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("edns", [None, 512, 1232, 4096])
def test_big_answer_truncated_over_udp(seed_server: ServerProcess, family: str, edns: int | None) -> None:
    message = dns.message.make_query("X.Big.TEST.", "TXT", use_edns=0 if edns else False, payload=edns or 0)
    message.id = 0x7E57
    query = message.to_wire()
    reply = raw(seed_server, query, "udp", family)
    msg_id, flags, qd, an, ns, ar = header(reply)
    assert msg_id == 0x7E57
    assert flags & QR and flags & TC, "too big for UDP: TC=1"
    assert flags & 0xF == 0
    # RFC 2181 §9 / RFC 6891 §7: no partial RRsets; the question (and OPT) stay.
    assert (qd, an, ns) == (1, 0, 0)
    assert ar == (1 if edns else 0)
    assert reply[HEADER.size : HEADER.size + len(question_bytes(query))] == question_bytes(query)
    assert len(reply) <= (512 if edns is None else 1232)
    parsed = dns.message.from_wire(reply)
    assert parsed.question[0].name.to_text() == "X.Big.TEST."
    if edns:
        assert parsed.edns == 0 and parsed.payload == 1232


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("edns", [False, True])
def test_big_answer_complete_over_tcp(seed_server: ServerProcess, family: str, edns: bool) -> None:
    query = dns.message.make_query(BIG_NAME, "TXT", use_edns=0 if edns else False)
    reply = ask(seed_server, query, "tcp", family)
    assert not reply.flags & dns.flags.TC
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(reply.answer) == 1
    texts = sorted(r.to_text() for r in reply.answer[0])
    assert len(texts) == BIG_COUNT
    assert '"record 0 padding padding padding padding"' in texts
    assert '"record 39 padding padding padding padding"' in texts
    assert (reply.opt is not None) == edns


def test_udp_client_retries_truncated_over_tcp(seed_server: ServerProcess) -> None:
    """dnspython's udp_with_fallback: TC over UDP, then the whole answer over TCP."""
    query = dns.message.make_query(BIG_NAME, "TXT", use_edns=0)
    reply, used_tcp = dns.query.udp_with_fallback(
        query, seed_server.host, port=seed_server.port, timeout=TIMEOUT
    )
    assert used_tcp
    assert len(reply.answer[0]) == BIG_COUNT


# Size limits on a server with answers of chosen size --------------------------------

SIZED_RULES = r"""
zones:
  sized.test:
    stages:
      - template:
          name: sized
          type: [TXT]
          match: ['^r(?P<n>\d+)\.sized\.test\.$']
          example: r2.sized.test
          answer:
            - |
              {% for i in range(group.n | int) %}{{ name }} 60 IN TXT "record {{ i }} {{ 'p' * 30 }}"
              {% endfor %}
"""


@pytest.fixture(scope="module")
def sized_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from stopped_cleanly(start_server(tmp_path_factory.mktemp("sized"), SIZED_RULES, ipv6=False))


@pytest.mark.parametrize(
    ("records", "edns", "truncated"),
    [
        (4, None, False),  # ~300 bytes: fits 512
        (4, 100, False),  # RFC 6891 §6.2.5: a payload under 512 counts as 512
        (15, None, True),  # ~850 bytes: over 512 without EDNS
        (15, 511, True),
        (15, 1232, False),
        (15, 4096, False),
        (40, 4096, True),  # ~2200 bytes: over our 1232 cap whatever the client offers
    ],
)
def test_udp_size_limits(
    sized_server: ServerProcess, records: int, edns: int | None, truncated: bool
) -> None:
    query = dns.message.make_query(
        f"r{records}.sized.test.", "TXT", use_edns=0 if edns else False, payload=edns or 0
    )
    wire = raw(sized_server, query.to_wire(), "udp")
    reply = dns.message.from_wire(wire)
    assert bool(reply.flags & dns.flags.TC) == truncated
    assert len(wire) <= (1232 if edns else 512)
    assert len(reply.question) == 1
    if truncated:
        assert reply.answer == []
    else:
        assert len(reply.answer[0]) == records
        full = dns.query.tcp(query, sized_server.host, port=sized_server.port, timeout=TIMEOUT)
        assert len(full.answer[0]) == records


# Malformed and unsupported messages --------------------------------------------------


def _query_wire(msg_id: int = 0xBEEF, name: str = "nodeb.mydomain.tld.", edns: bool = False) -> bytes:
    message = dns.message.make_query(name, "A", use_edns=0 if edns else False)
    message.id = msg_id
    return message.to_wire()


def _with_counts(wire: bytes, qd: int, an: int, ns: int, ar: int) -> bytes:
    msg_id, flags = struct.unpack_from("!HH", wire)
    return HEADER.pack(msg_id, flags, qd, an, ns, ar) + wire[HEADER.size :]


def _two_questions() -> bytes:
    wire = _query_wire()
    return _with_counts(wire, 2, 0, 0, 0) + question_bytes(wire)


def _two_opts() -> bytes:
    wire = _query_wire(edns=True)
    opt = wire[HEADER.size + len(question_bytes(wire)) :]
    return _with_counts(wire, 1, 0, 0, 2) + opt


def _opt_not_at_root() -> bytes:
    wire = _query_wire()
    opt = b"\x01x\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return _with_counts(wire, 1, 0, 0, 1) + opt


MALFORMED = {
    "qdcount-2": _two_questions,
    "qdcount-0": lambda: _with_counts(_query_wire(), 0, 0, 0, 0)[: HEADER.size],
    "name-past-end": lambda: _query_wire()[: HEADER.size + 8],
    "no-qtype": lambda: _query_wire()[:-4],
    "pointer-in-question": lambda: _query_wire()[: HEADER.size] + b"\xc0\x0c\x00\x01\x00\x01",
    "label-over-63": lambda: _query_wire()[: HEADER.size] + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",
    "two-opt": _two_opts,
    "opt-owner-not-root": _opt_not_at_root,
    "arcount-past-end": lambda: _with_counts(_query_wire(), 1, 0, 0, 1),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_gets_formerr_same_id(seed_server: ServerProcess, transport: str, case: str) -> None:
    reply = raw(seed_server, MALFORMED[case](), transport)
    msg_id, flags, *_counts = header(reply)
    assert msg_id == 0xBEEF
    assert flags & QR
    assert flags & 0xF == dns.rcode.FORMERR, f"rcode {flags & 0xF}"
    assert flags & 0x7800 == 0, "opcode QUERY copied"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE]
)
def test_other_opcodes_get_notimp(seed_server: ServerProcess, transport: str, opcode: int) -> None:
    query = dns.message.make_query("mydomain.tld.", "SOA")
    query.set_opcode(opcode)
    reply = ask(seed_server, query, transport)
    assert reply.id == query.id
    assert reply.flags & dns.flags.QR
    assert reply.opcode() == opcode, "RFC 1035 §4.1.1: the opcode is copied into the response"
    assert reply.rcode() == dns.rcode.NOTIMP


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_notimp_to_edns_query_has_opt(seed_server: ServerProcess, transport: str) -> None:
    """RFC 6891 §7: "If an OPT record is present in a received request, compliant
    responders MUST include an OPT record in their respective responses." -- NOTIMP too."""
    query = dns.message.make_query("mydomain.tld.", "SOA", use_edns=0)
    query.set_opcode(dns.opcode.NOTIFY)
    reply = ask(seed_server, query, transport)
    assert reply.rcode() == dns.rcode.NOTIMP
    assert reply.opt is not None, "NOTIMP reply to a well-formed EDNS query carries no OPT record"


@pytest.mark.parametrize("family", FAMILIES)
def test_no_reply_to_responses_or_runts_over_udp(seed_server: ServerProcess, family: str) -> None:
    host, port = where(seed_server, family)
    response = bytearray(_query_wire(0x0BAD))
    response[2] |= QR >> 8
    runt = _query_wire(0x0BAD)[:11]
    good = _query_wire(0x600D)
    sock_family = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
    with socket.socket(sock_family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)  # long enough for a reply on loopback; none may come
        for data in (bytes(response), runt):
            sock.sendto(data, (host, port))
            with pytest.raises(TimeoutError):
                sock.recvfrom(65535)
        # Still alive, and the next datagram on this socket answers the good query.
        sock.settimeout(TIMEOUT)
        sock.sendto(good, (host, port))
        reply, _peer = sock.recvfrom(65535)
    assert header(reply)[0] == 0x600D


def test_no_reply_to_response_over_tcp(seed_server: ServerProcess) -> None:
    response = bytearray(_query_wire(0x0BAD))
    response[2] |= QR >> 8
    with connect(seed_server.host, seed_server.port) as sock:
        sock.sendall(framed(bytes(response)) + framed(_query_wire(0x600D)))
        first = tcp_read(sock)
    assert header(first)[0] == 0x600D, "the QR=1 message got a reply"


# TCP: pipelining, fragmentation, limits ------------------------------------------------

PIPELINE_NAMES = [
    ("www.nodeb.mydomain.tld.", "A"),
    ("nodeb.mydomain.tld.", "AAAA"),
    ("nodea.mydomain.tld.", "A"),
    ("nodeb.mydomain.tld.", "MX"),
    ("example.org.", "A"),
    (BIG_NAME, "TXT"),
]


def _pipeline(count: int) -> dict[int, dns.message.Message]:
    queries = {}
    for i in range(count):
        name, qtype = PIPELINE_NAMES[i % len(PIPELINE_NAMES)]
        query = dns.message.make_query(name, qtype)
        query.id = 1000 + i
        queries[query.id] = query
    return queries


def _read_replies(sock: socket.socket, queries: dict[int, dns.message.Message]) -> None:
    seen: set[int] = set()
    first: dict[str, tuple[int, list[dns.rrset.RRset]]] = {}  # question -> the first rcode, answer
    for _ in range(len(queries)):
        reply = dns.message.from_wire(tcp_read(sock))
        assert reply.id in queries, f"unexpected ID {reply.id}"
        assert reply.id not in seen, f"ID {reply.id} answered twice"
        seen.add(reply.id)
        assert queries[reply.id].is_response(reply)
        assert not reply.flags & dns.flags.TC
        # Asked again, the same question gets the same answer (rrset equality ignores TTLs).
        question = reply.question[0].to_text()
        assert first.setdefault(question, (reply.rcode(), reply.answer)) == (reply.rcode(), reply.answer)
    assert seen == set(queries)


@pytest.fixture(scope="module")
def cached_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The seed's rules behind a cache: repeated names come from the hot path, in one write."""
    rules = SEED_RULES.replace("    stages:\n", "    stages:\n      - cache: {}\n", 1)
    assert "- cache: {}" in rules
    yield from stopped_cleanly(start_server(tmp_path_factory.mktemp("cached"), rules))


SERVERS = pytest.mark.parametrize("kind", ["seed_server", "cached_server"], ids=["full-path", "hot-path"])


@SERVERS
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("count", [20, 150])  # 150 > tcp.max_inflight (64): reading pauses and resumes
def test_tcp_pipelining_one_write(request: pytest.FixtureRequest, kind: str, family: str, count: int) -> None:
    server: ServerProcess = request.getfixturevalue(kind)
    queries = _pipeline(count)
    with connect(*where(server, family)) as sock:
        sock.sendall(b"".join(framed(q.to_wire()) for q in queries.values()))
        _read_replies(sock, queries)


@SERVERS
def test_tcp_messages_split_across_segments(request: pytest.FixtureRequest, kind: str) -> None:
    """Length prefixes and messages cut at arbitrary points still reassemble (RFC 7766 §8)."""
    server: ServerProcess = request.getfixturevalue(kind)
    queries = _pipeline(12)
    blob = b"".join(framed(q.to_wire()) for q in queries.values())
    with connect(server.host, server.port) as sock:
        for start in range(0, len(blob), 7):
            sock.sendall(blob[start : start + 7])
        _read_replies(sock, queries)


def test_tcp_many_queries_one_by_one(seed_server: ServerProcess) -> None:
    with connect(seed_server.host, seed_server.port) as sock:
        for i in range(30):
            sock.sendall(framed(_query_wire(2000 + i)))
            reply = dns.message.from_wire(tcp_read(sock))
            assert reply.id == 2000 + i
            assert [r.to_text() for r in reply.answer[0]] == ["100.64.0.2"]


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("idle"), SEED_RULES, "tcp:\n  idle_timeout: 0.5\n")
    yield from stopped_cleanly(server)


@pytest.mark.parametrize("family", FAMILIES)
def test_tcp_idle_connection_closed(idle_server: ServerProcess, family: str) -> None:
    with connect(*where(idle_server, family)) as sock:
        elapsed = peer_closed_within(sock, 3.0)
    assert elapsed >= 0.3, f"closed after {elapsed:.2f} s, before the 0.5 s idle timeout"


def test_tcp_idle_after_answer(idle_server: ServerProcess) -> None:
    with connect(idle_server.host, idle_server.port) as sock:
        sock.sendall(framed(_query_wire(0x1D1E)))
        assert header(tcp_read(sock))[0] == 0x1D1E
        elapsed = peer_closed_within(sock, 3.0)
    assert elapsed >= 0.3


def test_tcp_activity_keeps_connection_open(idle_server: ServerProcess) -> None:
    """Queries 0.2 s apart for 1 s: longer than the idle timeout, never idle that long."""
    with connect(idle_server.host, idle_server.port) as sock:
        for i in range(6):
            sock.sendall(framed(_query_wire(3000 + i)))
            assert header(tcp_read(sock))[0] == 3000 + i
            time.sleep(0.2)  # pacing the client, not waiting for the server
        peer_closed_within(sock, 3.0)


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("capped"), SEED_RULES, "tcp:\n  max_connections: 2\n")
    yield from stopped_cleanly(server)


def _answered(sock: socket.socket, msg_id: int) -> bool:
    sock.sendall(framed(_query_wire(msg_id)))
    return header(tcp_read(sock))[0] == msg_id


def test_tcp_connection_cap(capped_server: ServerProcess) -> None:
    # The table is full of idle connections: a newcomer is not turned away, the
    # connection idle longest is closed for it (RFC 7766 §6.2.3).
    host, port = capped_server.host, capped_server.port
    with connect(host, port) as first, connect(host, port) as second:
        assert _answered(first, 1)
        assert _answered(second, 2)
        with connect(host, port) as third:
            third.settimeout(TIMEOUT)
            assert _answered(third, 3)
            first.settimeout(TIMEOUT)
            with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
                _answered(first, 4)
            assert _answered(second, 5)


# dig ------------------------------------------------------------------------------------


def dig(*args: str) -> str:
    exe = require_tool("dig")
    result = subprocess.run(
        [exe, "-r", *args, "+tries=1", "+time=3"], capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def dig_at(server: ServerProcess, family: str, *args: str) -> str:
    host, port = where(server, family)
    return dig(f"@{host}", "-p", str(port), "-6" if family == "ipv6" else "-4", *args)


def dig_status(output: str) -> str:
    found = re.search(r"->>HEADER<<- opcode: (\w+), status: (\w+), id: \d+", output)
    assert found, output
    return found.group(2)


def dig_flags(output: str) -> set[str]:
    found = re.search(r"^;; flags: ([a-z ]*);", output, re.M)
    assert found, output
    return set(found.group(1).split())


def dig_count(output: str, section: str) -> int:
    found = re.search(rf"\b{section}: (\d+)", output)
    assert found, output
    return int(found.group(1))


def section_lines(output: str, title: str) -> list[list[str]]:
    """Records of one section, each split into fields."""
    lines = output.splitlines()
    marker = f";; {title} SECTION:"
    if marker not in lines:
        return []
    out = []
    for line in lines[lines.index(marker) + 1 :]:
        if not line.strip():
            break
        out.append(line.split())
    return out


@pytest.mark.needs_tool("dig")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dig_cname_chain(seed_server: ServerProcess, family: str, transport: str) -> None:
    args = ["www.nodeb.mydomain.tld"] + (["+tcp"] if transport == "tcp" else [])
    out = dig_at(seed_server, family, *args)
    assert dig_status(out) == "NOERROR"
    flags = dig_flags(out)
    assert {"qr", "aa", "rd"} <= flags and "ra" not in flags and "tc" not in flags
    assert section_lines(out, "ANSWER") == [
        ["www.nodeb.mydomain.tld.", "60", "IN", "CNAME", "nodeb.mydomain.tld."],
        ["nodeb.mydomain.tld.", "60", "IN", "A", "100.64.0.2"],
    ]
    assert re.search(rf"^;; SERVER: .*\({transport.upper()}\)$", out, re.M), out
    assert "; EDNS: version: 0, flags:; udp: 1232" in out


@pytest.mark.needs_tool("dig")
def test_dig_aaaa_case_preserved(seed_server: ServerProcess) -> None:
    out = dig_at(seed_server, "ipv6", CHAIN_NAME, "AAAA")
    assert dig_status(out) == "NOERROR"
    assert section_lines(out, "QUESTION") == [[";" + CHAIN_NAME, "IN", "AAAA"]]
    answer = section_lines(out, "ANSWER")
    assert answer[-1][3:] == ["AAAA", "fd7a:115c:a1e0::2"]
    assert answer[0][0] == CHAIN_NAME


@pytest.mark.needs_tool("dig")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dig_noedns(seed_server: ServerProcess, transport: str) -> None:
    args = ["www.nodeb.mydomain.tld", "+noedns"] + (["+tcp"] if transport == "tcp" else [])
    out = dig_at(seed_server, "ipv4", *args)
    assert dig_status(out) == "NOERROR"
    assert "OPT PSEUDOSECTION" not in out
    assert dig_count(out, "ADDITIONAL") == 0
    assert len(section_lines(out, "ANSWER")) == 2


@pytest.mark.needs_tool("dig")
def test_dig_dnssec_ok_echoed(seed_server: ServerProcess) -> None:
    out = dig_at(seed_server, "ipv4", "nodeb.mydomain.tld", "+dnssec")
    assert re.search(r"^; EDNS: version: 0, flags: do; udp: 1232$", out, re.M), out


@pytest.mark.needs_tool("dig")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bufsize", ["+bufsize=512", "+noedns"])
def test_dig_truncated(seed_server: ServerProcess, family: str, bufsize: str) -> None:
    out = dig_at(seed_server, family, BIG_NAME, "TXT", bufsize, "+ignore")
    assert dig_status(out) == "NOERROR"
    assert "tc" in dig_flags(out)
    assert dig_count(out, "QUERY") == 1
    assert dig_count(out, "ANSWER") == 0
    assert section_lines(out, "QUESTION") == [[";" + BIG_NAME, "IN", "TXT"]]


@pytest.mark.needs_tool("dig")
def test_dig_tcp_gets_all_records(seed_server: ServerProcess) -> None:
    out = dig_at(seed_server, "ipv4", BIG_NAME, "TXT", "+tcp")
    assert dig_status(out) == "NOERROR"
    assert "tc" not in dig_flags(out)
    assert dig_count(out, "ANSWER") == BIG_COUNT
    assert len([r for r in section_lines(out, "ANSWER") if r[3] == "TXT"]) == BIG_COUNT


@pytest.mark.needs_tool("dig")
def test_dig_falls_back_to_tcp(seed_server: ServerProcess) -> None:
    out = dig_at(seed_server, "ipv4", BIG_NAME, "TXT")
    assert "Truncated, retrying in TCP mode" in out
    assert dig_count(out, "ANSWER") == BIG_COUNT


@pytest.mark.needs_tool("dig")
def test_dig_nodata_and_refused(seed_server: ServerProcess) -> None:
    out = dig_at(seed_server, "ipv4", "nodeb.mydomain.tld", "MX")
    assert dig_status(out) == "NOERROR"
    assert dig_count(out, "ANSWER") == 0
    authority = section_lines(out, "AUTHORITY")
    assert len(authority) == 1 and authority[0][:4] == ["mydomain.tld.", "30", "IN", "SOA"]
    out = dig_at(seed_server, "ipv4", "example.org")
    assert dig_status(out) == "REFUSED"
    assert "EDE: 20 (Not Authoritative)" in out


@pytest.mark.needs_tool("dig")
@pytest.mark.parametrize("opcode", ["notify", "update"])
def test_dig_other_opcode_notimp(seed_server: ServerProcess, opcode: str) -> None:
    out = dig_at(seed_server, "ipv4", f"+opcode={opcode}", "+noedns", "mydomain.tld", "SOA")
    assert re.search(rf"opcode: {opcode.upper()}, status: NOTIMP", out), out


@pytest.mark.needs_tool("dig")
def test_dig_edns_version_1(seed_server: ServerProcess) -> None:
    out = dig_at(seed_server, "ipv4", "+edns=1", "+noednsneg", "nodeb.mydomain.tld")
    assert dig_status(out) == "BADVERS"
    assert "; EDNS: version: 0," in out


# kdig -----------------------------------------------------------------------------------


def kdig(server: ServerProcess, family: str, *args: str) -> str:
    exe = require_tool("kdig")
    host, port = where(server, family)
    result = subprocess.run(
        [exe, f"@{host}", "-p", str(port), "+timeout=3", "+retry=0", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    return result.stdout


def kdig_replies(output: str) -> list[str]:
    return [";; ->>HEADER<<-" + part for part in output.split(";; ->>HEADER<<-")[1:]]


def kdig_answers(reply: str) -> list[list[str]]:
    return section_lines(reply, "ANSWER")


@pytest.mark.needs_tool("kdig")
@pytest.mark.parametrize("family", FAMILIES)
def test_kdig_keepopen_many_queries(seed_server: ServerProcess, family: str) -> None:
    names = [
        ("www.nodeb.mydomain.tld", "A", "100.64.0.2"),
        ("nodeb.mydomain.tld", "AAAA", "fd7a:115c:a1e0::2"),
        ("nodea.mydomain.tld", "A", "100.64.0.1"),
        ("api.nodec.mydomain.tld", "A", "100.64.0.3"),
        ("NoDeH.MyDoMaIn.TlD", "A", "100.64.0.8"),
    ]
    args = ["+tcp", "+keepopen"]
    for name, qtype, _data in names:
        args += [name, qtype]
    replies = kdig_replies(kdig(seed_server, family, *args))
    assert len(replies) == len(names)
    for reply, (name, qtype, data) in zip(replies, names, strict=True):
        assert "status: NOERROR" in reply, reply
        assert "(TCP)" in reply
        # kdig lowercases names before sending, so only the name itself can be checked.
        assert section_lines(reply, "QUESTION") == [[";;", f"{name.lower()}.", "IN", qtype]], reply
        answers = kdig_answers(reply)
        assert answers[-1][3:] == [qtype, data], reply


@pytest.mark.needs_tool("kdig")
@pytest.mark.parametrize("family", FAMILIES)
def test_kdig_udp(seed_server: ServerProcess, family: str) -> None:
    (reply,) = kdig_replies(kdig(seed_server, family, "www.nodeb.mydomain.tld", "AAAA"))
    assert "status: NOERROR" in reply and "(UDP)" in reply
    assert re.search(r"Flags: qr aa rd;", reply), reply
    assert kdig_answers(reply)[-1][3:] == ["AAAA", "fd7a:115c:a1e0::2"]


@pytest.mark.needs_tool("kdig")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kdig_edns_and_noedns(seed_server: ServerProcess, transport: str) -> None:
    extra = ["+tcp"] if transport == "tcp" else []
    (with_edns,) = kdig_replies(kdig(seed_server, "ipv4", *extra, "+edns", "+nsid", "nodeb.mydomain.tld"))
    assert "EDNS PSEUDOSECTION" in with_edns
    assert re.search(r"Version: 0; flags: ; UDP size: 1232 B; ext-rcode: NOERROR", with_edns), with_edns
    (without,) = kdig_replies(kdig(seed_server, "ipv4", *extra, "+noedns", "nodeb.mydomain.tld"))
    assert "EDNS PSEUDOSECTION" not in without
    assert "ADDITIONAL: 0" in without


@pytest.mark.needs_tool("kdig")
def test_kdig_edns_cookie_and_padding_ignored(seed_server: ServerProcess) -> None:
    """Unknown or unimplemented EDNS options are ignored, not an error (RFC 6891 §6.1.2)."""
    out = kdig(seed_server, "ipv4", "+cookie", "+padding", "+ednsopt=65001:abcd", "nodeb.mydomain.tld")
    (reply,) = kdig_replies(out)
    assert "status: NOERROR" in reply
    assert kdig_answers(reply)[-1][3:] == ["A", "100.64.0.2"]


@pytest.mark.needs_tool("kdig")
def test_kdig_truncation_then_tcp(seed_server: ServerProcess) -> None:
    exe = require_tool("kdig")
    result = subprocess.run(
        [exe, f"@{seed_server.host}", "-p", str(seed_server.port), "+timeout=3", "+retry=0", BIG_NAME, "TXT"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "truncated reply" in result.stderr and "retrying over TCP" in result.stderr
    (reply,) = kdig_replies(result.stdout)
    assert "ANSWER: 40" in reply and "(TCP)" in reply
    (ignored,) = kdig_replies(kdig(seed_server, "ipv4", "+ignore", BIG_NAME, "TXT"))
    assert re.search(r"Flags: qr aa tc rd;", ignored), ignored
    assert "ANSWER: 0" in ignored and "QUERY: 1" in ignored


# Health --------------------------------------------------------------------------------


def test_server_still_healthy(seed_server: ServerProcess) -> None:
    """After everything above: still running, still answering, no traceback in the log."""
    assert seed_server.proc.poll() is None
    reply = ask(seed_server, dns.message.make_query(CHAIN_NAME, "A"), "udp")
    assert reply.rcode() == dns.rcode.NOERROR
    log = seed_server.log_text()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


def test_tcp_half_close_still_gets_every_pending_reply(tmp_path: Path) -> None:
    """A client that shuts down its sending side is owed its answers (RFC 7766 §6.2.4)."""
    with fake_upstream() as fake:
        fake.default, fake.delay = "delay", 0.2  # forwarded answers arrive after the EOF
        rules = f"""
        zones:
          mydomain.tld:
            stages:
              - template: {{type: [A], answer: ['{{{{ name }}}} 60 IN A 100.64.0.1']}}
          .:
            stages:
              - forward: {{upstreams: ["{fake.address}"], timeout: 2}}
        """
        server = start_server(tmp_path, rules, ipv6=False)
        try:
            names = ["slow1.example", "now.mydomain.tld", "slow2.example"]
            queries = {3000 + i: dns.message.make_query(n, "A") for i, n in enumerate(names)}
            for msg_id, query in queries.items():
                query.id = msg_id
            with connect(server.host, server.port) as sock:
                sock.sendall(b"".join(framed(q.to_wire()) for q in queries.values()))
                sock.shutdown(socket.SHUT_WR)
                replies = [dns.message.from_wire(tcp_read(sock)) for _ in queries]
                assert sock.recv(1) == b""  # then the server closes
            assert sorted(r.id for r in replies) == sorted(queries)
            assert all(r.rcode() == dns.rcode.NOERROR and r.answer for r in replies)
        finally:
            server.stop()
