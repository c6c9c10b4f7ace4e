"""Fuzzing the UDP and TCP listeners of a real server process, plus hand-made malformed messages.

Whatever bytes reach a listener, the server must stay up and keep its contract
(horizon_dns.core.wire): a message shorter than a header or with QR=1 gets no
reply; every other message gets exactly one reply, carrying its ID, with QR=1 and
a sane rcode; the server keeps answering and never logs a traceback.

Every test runs against two configurations of the seed rules: as they are, where
the full path (decode, pipeline, encode) answers everything, and with a cache
leading each zone, where a repeated question is answered by the synchronous hot
path (``QueryHandler.hot_answer``) straight from its bytes, code the full path
never runs. To reach it, each fuzz test first fills the cache, the strategies mix
those cached questions and mutations of them with garbage, and the server's
``hot_path_responses_total`` must have grown by the end of the test (and stay 0
without a cache).

No test waits on a timeout to learn that nothing came back: each fuzzed packet is
followed by a "sentinel" (a header with QDCOUNT=0 and ID 0xBEEF), which the server
answers with FORMERR straight away. Decisions to drop are taken before that, so
anything the fuzzed packet provokes arrives before the sentinel's reply, or, for
a packet that is answered, is waited for (it is expected). Timeouts only bound
failures.

``HORIZON_FUZZ_EXAMPLES`` sets the examples per fuzz test and configuration
(default 600; ``HORIZON_FUZZ_EXAMPLES=1000000 pytest --timeout 0`` for a long run).
Counts are printed. Packets go to 127.0.0.1 / ::1 only, to servers this module starts.
"""

from __future__ import annotations

import collections
import os
import re
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from conftest import SEED_RULES, ServerProcess, start_server
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("HORIZON_FUZZ_EXAMPLES", "600"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
FEW = settings(FUZZ, max_examples=max(10, EXAMPLES // 4))

SENTINEL_ID = 0xBEEF
SENTINEL = struct.pack("!HHHHHH", SENTINEL_ID, 0, 0, 0, 0, 0)  # QDCOUNT=0: FORMERR at once
SENTINEL_REPLY = struct.pack("!HHHHHH", SENTINEL_ID, 0x8001, 0, 0, 0, 0)
REPLY_WAIT = 3.0  # upper bound for an expected reply; only reached when something is wrong
SANE_RCODES = {0, 1, 2, 3, 4, 5, 16}  # NOERROR..REFUSED, BADVERS
COUNTS: collections.Counter[str] = collections.Counter()
PLAIN_LABEL = re.compile(rb"[A-Za-z0-9_-]+")

# The seed rules with a cache first in every zone: in mydomain.tld for the hot path
# itself, in big.test for its truncation of a cached reply too big for UDP.
CACHE_FIRST_RULES = SEED_RULES.replace("    stages:\n", "    stages:\n      - cache: {}\n")
assert CACHE_FIRST_RULES.count("- cache: {}") == 2
CONFIGS = {"plain": SEED_RULES, "cache-first": CACHE_FIRST_RULES}
HOT_HITS = re.compile(r"^horizon_dns_hot_path_responses_total (\S+)$", re.M)


@pytest.fixture(scope="module", params=list(CONFIGS))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server per configuration; after its tests it must exit 0 and have logged no traceback."""
    name: str = request.param
    process = start_server(tmp_path_factory.mktemp(f"fuzz-{name}"), CONFIGS[name])
    process.extra["config"] = name
    COUNTS.clear()  # one line of counts per server
    try:
        yield process
    finally:
        print(
            f"\nfuzz[{name}]: {COUNTS['udp']} UDP packets, {COUNTS['tcp']} TCP messages, "
            f"{COUNTS['framing']} garbage TCP streams, {COUNTS['structured']} hand-made messages; "
            f"{COUNTS['replies']} replies checked, {COUNTS['hot']} answered by the hot path while fuzzing"
        )
        code = process.stop()
        log = process.log_text()
        assert "Traceback" not in log, log
        assert code == 0, log


# ---------------------------------------------------------------- helpers


def cache_first(server: ServerProcess) -> bool:
    """Whether ``server`` runs the configuration with a cache leading each zone."""
    return server.extra["config"] == "cache-first"


def hot_path_responses(server: ServerProcess) -> int:
    """The server's count of replies from the hot path, read from its /metrics."""
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log_text())
    assert found, server.log_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/metrics", timeout=REPLY_WAIT) as page:
        text = page.read().decode()
    value = HOT_HITS.search(text)
    assert value, text
    return int(float(value.group(1)))


def wants_reply(message: bytes) -> bool:
    """Whether the server must answer this message (RFC 5452 §9: never answer a response)."""
    return len(message) >= 12 and not message[2] & 0x80


def check_reply(message: bytes, reply: bytes, transport: str) -> int:
    """A reply to ``message`` is well formed and sane; return its full rcode."""
    COUNTS["replies"] += 1
    assert len(message) >= 12, f"reply {reply!r} to a {len(message)}-byte message"
    assert not message[2] & 0x80, f"reply {reply!r} to a response (QR=1) {message!r}"
    assert reply[:2] == message[:2], f"reply ID {reply[:2]!r} for query {message!r}"
    assert len(reply) >= 12
    flags = struct.unpack_from("!H", reply, 2)[0]
    assert flags & 0x8000, "QR must be set"
    assert flags & 0x0040 == 0, "Z must be zero (RFC 1035 §4.1.1)"
    assert (flags >> 11) & 0xF == (message[2] >> 3) & 0xF, "opcode echoed"
    if transport == "udp":
        assert len(reply) <= 1232
        if struct.unpack_from("!H", message, 10)[0] == 0:  # no additional record: no OPT
            assert len(reply) <= 512, "a client without EDNS gets at most 512 bytes (RFC 1035 §4.2.1)"
    parsed = dns.message.from_wire(reply, ignore_trailing=False)
    rcode = parsed.rcode()
    assert rcode in SANE_RCODES, (message, reply)
    qdcount = struct.unpack_from("!H", reply, 4)[0]
    assert qdcount in (0, 1)
    if qdcount:
        qname = parsed.question[0].name
        qname_wire = qname.to_wire()
        assert qname_wire is not None  # (typed bytes | None: None only when writing to a file)
        question_len = len(qname_wire) + 4
        assert reply[12 : 12 + question_len] == message[12 : 12 + question_len], "question echoed as sent"
        if all(PLAIN_LABEL.fullmatch(label) for label in qname.labels[:-1]):
            # (Names with special characters: see test_answer_owner_is_the_qname_whatever_its_bytes.)
            check_answer_chain(qname, parsed)
    return rcode


def check_answer_chain(qname: dns.name.Name, reply: dns.message.Message) -> None:
    """Answer records belong to QNAME or to a CNAME target on its chain (RFC 1034 §4.3.2 step 3)."""
    owners = {qname}
    for rrset in reply.answer:
        assert rrset.name in owners, f"answer owner {rrset.name} is not {qname} or its CNAME chain"
        if rrset.rdtype == dns.rdatatype.CNAME:
            owners.add(rrset[0].target)


def udp_exchange(server: ServerProcess, packet: bytes) -> list[bytes]:
    """Send ``packet`` and the sentinel; return what answered ``packet`` (checked)."""
    replies: list[bytes] = []
    expected = wants_reply(packet)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((server.host, server.port))
        sock.send(packet)
        sock.send(SENTINEL)
        COUNTS["udp"] += 1
        deadline = time.monotonic() + REPLY_WAIT
        sentinel_seen = False
        while not sentinel_seen or (expected and not replies):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no reply to {packet!r} (sentinel answered: {sentinel_seen})"
            sock.settimeout(remaining)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                pytest.fail(
                    f"no reply to {packet!r} within {REPLY_WAIT} s (sentinel answered: {sentinel_seen})"
                )
            if data == SENTINEL_REPLY:
                sentinel_seen = True
                continue
            check_reply(packet, data, "udp")
            replies.append(data)
    assert len(replies) == (1 if expected else 0), (packet, replies)
    return replies


def read_frame(sock: socket.socket, deadline: float) -> bytes | None:
    """One length-prefixed message, or None at EOF."""
    buffer = b""
    need = 2
    length: int | None = None
    while len(buffer) < need:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "timed out reading a TCP reply"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(need - len(buffer))
        except TimeoutError:
            pytest.fail(f"timed out reading a TCP reply ({len(buffer)} of {need} bytes)")
        if not chunk:
            assert not buffer, "the server closed the connection in the middle of a reply"
            return None
        buffer += chunk
        if length is None and len(buffer) >= 2:
            (length,) = struct.unpack_from("!H", buffer)
            need = 2 + length
    return buffer[2:]


def frame(message: bytes) -> bytes:
    """``message`` behind its 16-bit length (RFC 1035 §4.2.2)."""
    return struct.pack("!H", len(message)) + message


def tcp_exchange(server: ServerProcess, messages: list[bytes]) -> list[bytes]:
    """Send ``messages`` framed and pipelined, then the sentinel; return the checked replies."""
    by_id: dict[bytes, list[bytes]] = collections.defaultdict(list)
    for message in messages:
        if wants_reply(message):
            by_id[message[:2]].append(message)
    outstanding = collections.Counter({msg_id: len(group) for msg_id, group in by_id.items()})
    replies: list[bytes] = []
    with socket.create_connection((server.host, server.port), timeout=REPLY_WAIT) as sock:
        sock.sendall(b"".join(frame(m) for m in messages) + frame(SENTINEL))
        COUNTS["tcp"] += len(messages)
        deadline = time.monotonic() + REPLY_WAIT
        sentinel_seen = False
        while not sentinel_seen or +outstanding:
            reply = read_frame(sock, deadline)
            assert reply is not None, f"connection closed; still expected replies for {dict(outstanding)}"
            if reply == SENTINEL_REPLY:
                sentinel_seen = True
                continue
            msg_id = reply[:2]
            assert outstanding[msg_id] > 0, f"unexpected reply {reply!r} to {messages!r}"
            outstanding[msg_id] -= 1
            # Same-ID messages are answered in any order: accept the reply if it fits any of them.
            errors = []
            for candidate in by_id[msg_id]:
                try:
                    check_reply(candidate, reply, "tcp")
                    break
                except AssertionError as exc:
                    errors.append(exc)
            else:
                raise errors[0]
            replies.append(reply)
    return replies


def valid_query(name: str = "nodeb.mydomain.tld", rdtype: str = "A", **kwargs: object) -> dns.message.Message:
    """A well-formed query, by default for a name the seed answers with 100.64.0.2."""
    return dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]


def assert_still_answering(server: ServerProcess) -> None:
    """The server answers correctly over UDP and TCP, IPv4 and IPv6."""
    targets = [(server.host, server.port)]
    if server.host6 is not None and server.port6 is not None:
        targets.append((server.host6, server.port6))
    for host, port in targets:
        for send in (dns.query.udp, dns.query.tcp):
            query = valid_query(use_edns=0)
            reply = send(query, host, port=port, timeout=REPLY_WAIT)
            assert reply.id == query.id and reply.rcode() == dns.rcode.NOERROR
            assert [rr.to_text() for rr in reply.answer[0]] == ["100.64.0.2"]
    # Truncation still works: the TXT answer is too big for UDP and whole over TCP.
    query = valid_query("many.big.test", "TXT")
    udp = dns.query.udp(query, server.host, port=server.port, timeout=REPLY_WAIT, ignore_trailing=False)
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = dns.query.tcp(query, server.host, port=server.port, timeout=REPLY_WAIT)
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 40


# ---------------------------------------------------------------- strategies


def _mutate(base: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: overwrite, insert or delete a byte."""
    data = bytearray(base)
    for kind, position, value in edits:
        if not data:
            data.append(value)
            continue
        index = position % len(data)
        if kind == 0:
            data[index] = value
        elif kind == 1:
            data.insert(index, value)
        else:
            del data[index]
    return bytes(data)


# What reaches_hot_path asks before each fuzz test. With a cache, those in a zone
# (all but example.com) are then the hot path's: each flag and EDNS variant is an entry.
BASE_QUERIES = [
    valid_query().to_wire(),
    valid_query("NodeC.MyDomain.Tld", "AAAA", use_edns=0, want_dnssec=True).to_wire(),
    valid_query("svc.hub.mydomain.tld", "A", use_edns=0, payload=4096).to_wire(),
    valid_query("many.big.test", "TXT").to_wire(),
    valid_query("example.com", "MX", use_edns=0).to_wire(),
]


def _asked_again(base: bytes, msg_id: int, swap_case: bool) -> bytes:
    """``base`` under another ID, its name in the same or swapped case: the same cache entry."""
    end = base.index(b"\x00", 12)  # the root label: base names are plain ASCII
    name = base[12:end].swapcase() if swap_case else base[12:end]
    return struct.pack("!H", msg_id) + base[2:12] + name + base[end:]


cached_queries = st.builds(_asked_again, st.sampled_from(BASE_QUERIES), st.integers(0, 0xFFFF), st.booleans())

mutated_queries = st.builds(
    _mutate,
    st.sampled_from(BASE_QUERIES),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=6),
)

_labels = st.one_of(
    st.binary(min_size=0, max_size=70).map(lambda b: bytes([len(b)]) + b),
    st.integers(0xC000, 0xFFFF).map(lambda p: struct.pack("!H", p)),  # compression pointers, loops
    st.sampled_from([b"\x00", b"\x05nodeb\x08mydomain\x03tld\x00", b"\x03big\x04test\x00"]),
)

# An OPT record with any payload size, extended rcode, version, flags and options.
_opt_records = st.builds(
    lambda size, ext, version, flags, data: (
        b"\x00\x00\x29" + struct.pack("!HBBHH", size, ext, version, flags, len(data)) + data
    ),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.integers(0, 3),
    st.integers(0, 0xFFFF),
    st.binary(max_size=20),
)

structured = st.builds(
    lambda msg_id, flags, counts, name, tail, opt: (
        struct.pack("!HH", msg_id, flags) + struct.pack("!HHHH", *counts) + b"".join(name) + tail + opt
    ),
    st.integers(0, 0xFFFF).filter(lambda i: i != SENTINEL_ID),
    # QR=0 mostly, so the server decodes further; sometimes QR=1, which must stay unanswered.
    st.builds(lambda f, qr: (f & 0x7FFF) | qr, st.integers(0, 0xFFFF), st.sampled_from([0, 0, 0, 0x8000])),
    st.tuples(*(st.sampled_from([0, 1, 1, 2, 255, 0xFFFF]) for _ in range(4))),
    st.lists(_labels, max_size=6),
    st.binary(max_size=40),
    st.one_of(st.just(b""), _opt_records),
)

packets = st.one_of(st.binary(max_size=600), cached_queries, mutated_queries, structured)


@pytest.fixture
def reaches_hot_path(server: ServerProcess) -> Iterator[None]:
    """Fill the cache, run the test, then check who answered: with a cache the hot
    path answered some of its packets (else the fuzz missed it); without, none."""
    for query in BASE_QUERIES:
        udp_exchange(server, query)
    before = hot_path_responses(server)
    yield
    after = hot_path_responses(server)
    COUNTS["hot"] += after - before
    if cache_first(server):
        assert after > before, "no fuzzed packet reached the hot path"
    else:
        assert after == 0, "the hot path answered without a cache"


def _not_sentinel_id(message: bytes) -> bool:
    """Whether ``message`` cannot be mistaken for the sentinel by its ID."""
    return message[:2] != SENTINEL[:2]


# ---------------------------------------------------------------- UDP


@FUZZ
@given(packet=packets)
@example(packet=_asked_again(BASE_QUERIES[0], 0x1234, swap_case=True))  # a hot-path question every run
def test_udp_fuzz(server: ServerProcess, reaches_hot_path: None, packet: bytes) -> None:
    assume(_not_sentinel_id(packet))
    udp_exchange(server, packet)


def test_udp_no_reply_to_short_messages_or_responses(server: ServerProcess) -> None:
    query = valid_query().to_wire()
    # Asked first so that, with a cache, the prefixes and the response below are of a
    # cached question: the hot path must stay silent too.
    assert len(udp_exchange(server, query)) == 1
    for size in range(12):
        assert udp_exchange(server, query[:size]) == []
    response = dns.message.make_response(valid_query()).to_wire()
    assert udp_exchange(server, response) == []
    # QR=1 with an opcode we do not implement: still silence, not NOTIMP.
    assert udp_exchange(server, query[:2] + b"\xa8\x00" + query[4:]) == []
    assert_still_answering(server)


# ---------------------------------------------------------------- TCP


@FUZZ
@given(messages=st.lists(packets, min_size=1, max_size=4))
@example(messages=[b"\x00\x01garbage", _asked_again(BASE_QUERIES[3], 0x1234, swap_case=False)])
def test_tcp_fuzz(server: ServerProcess, reaches_hot_path: None, messages: list[bytes]) -> None:
    assume(all(_not_sentinel_id(m) for m in messages))
    tcp_exchange(server, messages)


def _split_frames(stream: bytes) -> list[bytes]:
    """The complete messages the server finds in a byte stream (RFC 1035 §4.2.2 framing)."""
    messages = []
    offset = 0
    while offset + 2 <= len(stream):
        (length,) = struct.unpack_from("!H", stream, offset)
        if offset + 2 + length > len(stream):
            break
        messages.append(stream[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return messages


garbage_streams = st.one_of(
    st.binary(max_size=300),
    # A believable prefix and less than it announced.
    st.builds(
        lambda length, body: struct.pack("!H", length) + body[: max(0, length - 1)],
        st.integers(1, 0xFFFF),
        st.binary(max_size=200),
    ),
    # Complete messages followed by a cut one.
    st.builds(
        lambda messages, cut: b"".join(frame(m) for m in messages) + frame(cut)[: max(1, len(cut))],
        st.lists(packets, max_size=3),
        packets,
    ),
)


@FEW
@given(stream=garbage_streams)
def test_tcp_garbage_framing(server: ServerProcess, stream: bytes) -> None:
    """Unframed bytes, then EOF: whatever comes back answers a message in them, then a clean close."""
    complete = _split_frames(stream)
    assume(all(_not_sentinel_id(m) for m in complete))
    allowed = collections.Counter(m[:2] for m in complete if wants_reply(m))
    with socket.create_connection((server.host, server.port), timeout=REPLY_WAIT) as sock:
        sock.sendall(stream)
        sock.shutdown(socket.SHUT_WR)
        COUNTS["framing"] += 1
        deadline = time.monotonic() + REPLY_WAIT
        while (reply := read_frame(sock, deadline)) is not None:
            assert allowed[reply[:2]] > 0, f"reply {reply!r} to nothing in {stream!r}"
            allowed[reply[:2]] -= 1
            COUNTS["replies"] += 1


@pytest.mark.parametrize(
    "opening",
    [
        b"\x01",  # half a length prefix
        struct.pack("!H", 500) + b"\x12\x34only part of it",
        struct.pack("!H", 0xFFFF),
        struct.pack("!H", 30) + valid_query().to_wire(),  # the prefix announces less than follows
    ],
    ids=["half-prefix", "short-body", "max-prefix-no-body", "prefix-too-small"],
)
@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_tcp_cut_connection_then_new_connection(server: ServerProcess, opening: bytes, reset: bool) -> None:
    sock = socket.create_connection((server.host, server.port), timeout=REPLY_WAIT)
    try:
        sock.sendall(opening)
        if reset:  # RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    COUNTS["framing"] += 1
    query = valid_query(use_edns=0)
    reply = dns.query.tcp(query, server.host, port=server.port, timeout=REPLY_WAIT)
    assert reply.id == query.id and [rr.to_text() for rr in reply.answer[0]] == ["100.64.0.2"]


def test_tcp_empty_frames_are_dropped_and_the_connection_stays_usable(server: ServerProcess) -> None:
    query = valid_query(use_edns=0)
    query.id = 0x4242
    stream = frame(b"") + frame(b"\x00") + frame(b"\x42\x42\x81\x00") + frame(query.to_wire())
    with socket.create_connection((server.host, server.port), timeout=REPLY_WAIT) as sock:
        sock.sendall(stream)
        reply = read_frame(sock, time.monotonic() + REPLY_WAIT)
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert query.is_response(parsed) and [rr.to_text() for rr in parsed.answer[0]] == ["100.64.0.2"]


def test_tcp_largest_message_is_answered(server: ServerProcess) -> None:
    """A 65535-byte query (EDNS padding, RFC 7830) fits the 16-bit length and is answered."""
    base = valid_query(use_edns=0).to_wire()
    padding = 65535 - len(base) - 4
    wire = base[:-2] + struct.pack("!H", padding + 4) + struct.pack("!HH", 12, padding) + bytes(padding)
    assert len(wire) == 65535
    (reply,) = tcp_exchange(server, [wire])
    assert dns.message.from_wire(reply).answer[0][0].to_text() == "100.64.0.2"


# ---------------------------------------------------------------- structured but wrong

HEADER = struct.Struct("!HHHHHH")
QUESTION = b"\x05nodeb\x08mydomain\x03tld\x00\x00\x01\x00\x01"


def msg(msg_id: int, flags: int = 0x0100, counts: tuple[int, int, int, int] = (1, 0, 0, 0)) -> bytes:
    """A header: RD set and one question unless told otherwise."""
    return HEADER.pack(msg_id, flags, *counts)


def opt(
    version: int = 0, do: bool = False, payload: int = 1232, rdata: bytes = b"", rdlength: int = -1
) -> bytes:
    """An OPT record owned by the root; ``rdlength`` may lie about ``rdata``."""
    ttl = (version << 16) | (0x8000 if do else 0)
    return b"\x00" + struct.pack("!HHIH", 41, payload, ttl, len(rdata) if rdlength < 0 else rdlength) + rdata


def record(owner: bytes, rtype: int = 1, rclass: int = 1, rdata: bytes = b"\x7f\x00\x00\x01") -> bytes:
    """A resource record with ``owner`` taken as given (pointers included)."""
    return owner + struct.pack("!HHIH", rtype, rclass, 60, len(rdata)) + rdata


def question(qtype: int = 1, qclass: int = 1) -> bytes:
    """nodeb.mydomain.tld with another type or class."""
    return QUESTION[:-4] + struct.pack("!HH", qtype, qclass)


# The answer record of a query starts at 12 + len(QUESTION) = 40.
ANSWER_AT = 12 + len(QUESTION)
FORMERR, NOTIMP, BADVERS = 1, 4, 16
ANY_SANE = None

STRUCTURED_CASES: dict[str, tuple[bytes, int | None]] = {
    # Bad counts.
    "qdcount-0": (msg(0x0101, counts=(0, 0, 0, 0)) + QUESTION, FORMERR),
    "qdcount-2-one-question": (msg(0x0102, counts=(2, 0, 0, 0)) + QUESTION, FORMERR),
    "qdcount-2-two-questions": (msg(0x0103, counts=(2, 0, 0, 0)) + QUESTION + QUESTION, FORMERR),
    "qdcount-65535": (msg(0x0104, counts=(0xFFFF, 0, 0, 0)) + QUESTION, FORMERR),
    "qdcount-1-no-question": (msg(0x0105), FORMERR),
    "ancount-1-nothing": (msg(0x0106, counts=(1, 1, 0, 0)) + QUESTION, FORMERR),
    "nscount-65535": (msg(0x0107, counts=(1, 0, 0xFFFF, 0)) + QUESTION, FORMERR),
    "arcount-65535": (msg(0x0108, counts=(1, 0, 0, 0xFFFF)) + QUESTION + opt(), FORMERR),
    "arcount-65535-every-count": (msg(0x0109, counts=(0xFFFF,) * 4) + QUESTION, FORMERR),
    # Compression in record sections: loops and pointers nowhere.
    "answer-pointer-to-itself": (
        msg(0x0201, counts=(1, 1, 0, 0)) + QUESTION + record(struct.pack("!H", 0xC000 | ANSWER_AT)),
        ANY_SANE,
    ),
    "two-pointers-in-a-loop": (
        msg(0x0202, counts=(1, 0, 0, 2))
        + QUESTION
        + record(struct.pack("!H", 0xC000 | (ANSWER_AT + 16)))
        + record(struct.pack("!H", 0xC000 | ANSWER_AT)),
        ANY_SANE,
    ),
    "label-then-pointer-loop": (
        msg(0x0203, counts=(1, 1, 0, 0))
        + QUESTION
        + record(b"\x01a" + struct.pack("!H", 0xC000 | ANSWER_AT)),
        ANY_SANE,
    ),
    "pointer-past-the-end": (msg(0x0204, counts=(1, 1, 0, 0)) + QUESTION + record(b"\xff\xff"), ANY_SANE),
    "pointer-cut-in-half": (msg(0x0205, counts=(1, 1, 0, 0)) + QUESTION + b"\xc0", FORMERR),
    "opt-owner-pointer-loop": (
        msg(0x0206, counts=(1, 0, 0, 1)) + QUESTION + struct.pack("!H", 0xC000 | ANSWER_AT) + opt()[1:],
        FORMERR,  # RFC 6891 §6.1.2: the OPT owner MUST be the root
    ),
    "record-data-past-the-end": (
        msg(0x0207, counts=(1, 1, 0, 0)) + QUESTION + record(b"\x00")[:-2],
        FORMERR,
    ),
    "pointer-in-question": (msg(0x0208) + b"\xc0\x0c\x00\x01\x00\x01", FORMERR),
    "label-64": (msg(0x0209) + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", FORMERR),
    "reserved-label-type": (msg(0x020A) + b"\x80" + b"a" * 0x80 + b"\x00\x00\x01\x00\x01", FORMERR),
    "name-over-255": (msg(0x020B) + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", FORMERR),
    # EDNS.
    "opt-version-1": (msg(0x0301, counts=(1, 0, 0, 1)) + QUESTION + opt(version=1), BADVERS),
    "opt-version-255-do": (msg(0x0302, counts=(1, 0, 0, 1)) + QUESTION + opt(version=255, do=True), BADVERS),
    "two-opts": (msg(0x0303, counts=(1, 0, 0, 2)) + QUESTION + opt() + opt(), FORMERR),  # RFC 6891 §6.1.1
    "opt-rdlength-past-the-end": (msg(0x0304, counts=(1, 0, 0, 1)) + QUESTION + opt(rdlength=40), FORMERR),
    "opt-option-longer-than-rdata": (
        msg(0x0305, counts=(1, 0, 0, 1)) + QUESTION + opt(rdata=struct.pack("!HH", 3, 50) + b"ab"),
        ANY_SANE,
    ),
    "opt-payload-0": (msg(0x0306, counts=(1, 0, 0, 1)) + QUESTION + opt(payload=0), 0),
    "opt-in-answer-section": (msg(0x0307, counts=(1, 1, 0, 0)) + QUESTION + opt(), ANY_SANE),
    "opt-non-root-owner": (
        msg(0x0308, counts=(1, 0, 0, 1)) + QUESTION + b"\x01a\x00" + opt()[1:],
        FORMERR,
    ),
    # Classes and types.
    "class-CH": (msg(0x0401) + question(qclass=3), ANY_SANE),
    "class-HS": (msg(0x0402) + question(qclass=4), ANY_SANE),
    "class-NONE": (msg(0x0403) + question(qclass=254), ANY_SANE),
    "class-ANY": (msg(0x0404) + question(qclass=255), ANY_SANE),
    "class-0": (msg(0x0405) + question(qclass=0), ANY_SANE),
    "class-65535": (msg(0x0406) + question(qclass=0xFFFF), ANY_SANE),
    "qtype-0": (msg(0x0407) + question(qtype=0), ANY_SANE),
    "qtype-OPT": (msg(0x0408) + question(qtype=41), ANY_SANE),
    "qtype-AXFR": (msg(0x0409) + question(qtype=252), ANY_SANE),
    "qtype-IXFR": (msg(0x040A) + question(qtype=251), ANY_SANE),
    "qtype-TSIG": (msg(0x040B) + question(qtype=250), ANY_SANE),
    "qtype-65535": (msg(0x040C) + question(qtype=0xFFFF), ANY_SANE),
    # Header bits and opcodes.
    "opcode-IQUERY": (msg(0x0501, flags=1 << 11) + QUESTION, NOTIMP),
    "opcode-STATUS": (msg(0x0502, flags=2 << 11) + QUESTION, NOTIMP),
    "opcode-NOTIFY-edns": (msg(0x0503, flags=4 << 11, counts=(1, 0, 0, 1)) + QUESTION + opt(do=True), NOTIMP),
    "opcode-UPDATE": (msg(0x0504, flags=5 << 11, counts=(0, 0, 0, 0)), NOTIMP),
    "opcode-15-garbage": (msg(0x0505, flags=15 << 11, counts=(9, 9, 9, 9)) + b"\xc0" * 5, NOTIMP),
    "z-bit-tc-aa-ad-set": (msg(0x0506, flags=0x0100 | 0x0040 | 0x0200 | 0x0400 | 0x0020) + QUESTION, 0),
    "rcode-set-in-query": (msg(0x0507, flags=0x0105) + QUESTION, 0),
    "trailing-garbage": (msg(0x0508) + QUESTION + b"garbage after the question", ANY_SANE),
    "header-only": (msg(0x0509), FORMERR),
}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("case", list(STRUCTURED_CASES))
def test_structured_but_wrong(server: ServerProcess, case: str, transport: str) -> None:
    message, expected = STRUCTURED_CASES[case]
    COUNTS["structured"] += 1
    if transport == "udp":
        (reply,) = udp_exchange(server, message)
    else:
        (reply,) = tcp_exchange(server, [message])
    parsed = dns.message.from_wire(reply)
    if expected is not None:
        assert parsed.rcode() == expected, f"{case}: {dns.rcode.to_text(parsed.rcode())} for {message!r}"
    if expected == BADVERS:
        # RFC 6891 §6.1.3: 12-bit rcode 16 = header 0 + OPT extended 1; we answer as version 0.
        assert struct.unpack_from("!H", reply, 2)[0] & 0xF == 0
        assert parsed.edns == 0
        assert bool(parsed.ednsflags & dns.flags.DO) == ("do" in case)
        assert not parsed.answer
    if case == "opcode-NOTIFY-edns":
        assert parsed.edns == 0, "RFC 6891 §7: a reply to a request with OPT carries OPT"
        assert parsed.ednsflags & dns.flags.DO
    if case == "z-bit-tc-aa-ad-set":
        assert not parsed.flags & dns.flags.TC and parsed.answer


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize(
    "body",
    [
        b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 0),  # QDCOUNT=0 and an OPT with DO
        QUESTION + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 0),  # QDCOUNT=2
    ],
    ids=["qdcount-0", "qdcount-2"],
)
def test_formerr_to_a_request_with_opt_carries_opt(
    server: ServerProcess, body: bytes, transport: str
) -> None:
    """RFC 6891 §7: "If an OPT record is present in a received request, compliant responders
    MUST include an OPT record in their respective responses." The OPT here is well formed
    and findable (the server finds it the same way for NOTIMP); only the question is wrong."""
    qdcount = 0 if body.startswith(b"\x00") else 2
    message = msg(0x0701 + qdcount, counts=(qdcount, 0, 0, 1)) + body
    COUNTS["structured"] += 1
    if transport == "udp":
        (reply,) = udp_exchange(server, message)
    else:
        (reply,) = tcp_exchange(server, [message])
    parsed = dns.message.from_wire(reply)
    assert parsed.rcode() == dns.rcode.FORMERR
    assert parsed.edns == 0, f"FORMERR without OPT: {reply!r}"
    assert parsed.ednsflags & dns.flags.DO


@pytest.mark.parametrize(
    "label",
    [
        b"plain",
        b"MiXeD",
        b"a b",
        b"\x01\x7f",
        b"x.y",
        b"back\\slash",
        b"at@",
        b"(paren)",
        b"$dollar",
        b"\xc3\xa9t\xc3\xa9",
        b"\xff",
        b'quote"',
        b"semi;colon",
    ],
    ids=[
        "plain",
        "mixed-case",
        "space",
        "control-bytes",
        "dot",
        "backslash",
        "at-sign",
        "parentheses",
        "dollar",
        "utf-8",
        "byte-ff",
        "double-quote",
        "semicolon",
    ],
)
def test_answer_owner_is_the_qname_whatever_its_bytes(server: ServerProcess, label: bytes) -> None:
    """A label may hold any octet (RFC 2181 §11); the answer must be for the name asked.

    The seed's service-cname template answers ``<anything>.nodeb.mydomain.tld`` with
    ``{{ name }} CNAME nodeb.mydomain.tld.``; the CNAME's owner must be QNAME
    (RFC 1034 §4.3.2 step 3a), otherwise a stub discards the answer. Asked twice:
    with a cache, the second answer is the hot path's.
    """
    qname = dns.name.Name([label, b"nodeb", b"mydomain", b"tld", b""])
    for _ in range(2):
        hot_before = hot_path_responses(server)
        query = dns.message.make_query(qname, "A")
        reply = dns.query.udp(query, server.host, port=server.port, timeout=REPLY_WAIT)
        COUNTS["structured"] += 1
        assert reply.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(reply.rcode())
        assert reply.answer, "no answer"
        owners = [rrset.name.to_text() for rrset in reply.answer]
        assert reply.answer[0].name == qname, f"answer owners {owners} for question {qname}"
        assert reply.answer[0].rdtype == dns.rdatatype.CNAME
        check_answer_chain(qname, reply)
        assert reply.answer[-1][0].to_text() == "100.64.0.2"
    if cache_first(server):
        assert hot_path_responses(server) > hot_before, "the second answer was not the hot path's"


def test_server_still_answers_and_logs_no_traceback(server: ServerProcess) -> None:
    """Last in the module: after all of the above, a valid query is answered correctly."""
    assert_still_answering(server)
    assert server.proc.poll() is None, "the server exited"
    log = server.log_text()
    assert "Traceback" not in log, log
