"""The hot path returns nothing, or exactly the bytes the full path returns.

The rule for every fast path (DECISIONS.md 5): for any query bytes, any cache
state, any client (allowed or not, rate limited or not) and a frozen clock,
``QueryHandler.hot_answer`` -- and the batched UDP listener's shortcut in front of
it -- gives None or the full path's reply, truncation included. hypothesis draws
the queries (well-formed ones of every shape, mutations of them and arbitrary
bytes), the queries that filled the cache before, how long ago, and the clients.
A second test keeps the first from passing vacuously: on the queries it is made
for, the hot path does answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from helpers import FakeClock, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from horizon_dns.config.load import load_config
from horizon_dns.core.access import Acl, EdgePolicy
from horizon_dns.core.clock import now as real_now
from horizon_dns.core.handler import QueryHandler
from horizon_dns.core.pipeline import Pipeline
from horizon_dns.core.wire import scan_common
from horizon_dns.net.udp import BatchedUdpListener, BatchTransport, InFlight, UdpListener
from horizon_dns.stages.cache import CacheStage

EXAMPLES = int(os.environ.get("HORIZON_HOT_PATH_EXAMPLES", "400"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

# A zone led by a cache (the hot path's), one without (never the hot path's), and
# names in neither. Templates give positive answers, a CNAME chain, a negative
# answer with SOA, a reply too big for UDP, and one that depends on the client.
RULES = r"""
zones:
  t.test:
    stages:
      - cache: {min_ttl: 0, max_ttl: 3600}
      - template:
          name: chain
          type: [A, AAAA]
          match: ['^(?P<p>.+)\.(?P<h>[a-z]+)\.t\.test\.$']
          answer: ['{{ name }} 60 IN CNAME {{ group.h }}.t.test.']
      - template:
          name: hosts
          type: [A]
          match: ['^(?P<h>[a-z]+)\.t\.test\.$']
          answer: ['{{ name }} 300 IN A 100.64.0.7']
      - template:
          name: big
          type: [TXT]
          match: ['^big\.t\.test\.$']
          answer:
            - |
              {% for i in range(30) %}{{ name }} 120 IN TXT "record {{ i }} padding padding padding padding"
              {% endfor %}
      - template:
          name: who
          type: [TXT]
          match: ['^who\.t\.test\.$']
          answer: ['{{ name }} 60 IN TXT "{{ client }}"']
  n.test:
    stages:
      - template:
          name: plain
          type: [A]
          answer: ['{{ name }} 60 IN A 100.64.0.9']
"""

LABELS = ["a", "B", "www", "nodeb", "big", "who", "x-1"]
SUFFIXES = ["t.test", "T.Test", "n.test", "other.example", ""]
# The names the rules answer in each way, drawn more often than chance would.
NAMES = ["big.t.test", "who.t.test", "a.t.test", "www.nodeb.t.test", "nothere.x.t.test", "t.test", "a.n.test"]
TYPES = [1, 1, 28, 16, 16, 5, 15, 255, 65, 2]
CLASSES = [1, 1, 1, 3, 255]
PAYLOADS = [0, 511, 512, 1232, 1400, 4096, 65535]
OPTIONS = [b"", b"\x00\x03\x00\x00", b"\x00\x0f\x00\x02\x00\x00", b"\x00\x0a\x00\x08" + b"c" * 8, b"\x00\x03"]


def _name(labels: list[str], suffix: str) -> bytes:
    text = ".".join([*labels, suffix]).strip(".")
    return b"".join(bytes([len(part)]) + part.encode() for part in text.split(".") if part) + b"\x00"


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    """Well-formed queries of every shape the hot path might meet (and some it must decline)."""
    msg_id = draw(st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from([0x0100, 0x0000, 0x0110, 0x0010, 0x0120])) | draw(
        st.sampled_from([0] * 6 + [0x8000, 0x0800, 0x0400, 0x0200, 0x0040, 0x000F])
    )
    if draw(st.booleans()):
        text = draw(st.sampled_from(NAMES))
        name = _name([draw(st.sampled_from([text, text.upper(), text.title()]))], "")
    else:
        name = _name(draw(st.lists(st.sampled_from(LABELS), max_size=3)), draw(st.sampled_from(SUFFIXES)))
    question = name + struct.pack("!HH", draw(st.sampled_from(TYPES)), draw(st.sampled_from(CLASSES)))
    opt = b""
    if draw(st.booleans()):
        version = draw(st.sampled_from([0, 0, 0, 1]))
        do = draw(st.booleans())
        options = draw(st.sampled_from(OPTIONS))
        ttl = (version << 16) | (0x8000 if do else 0)
        owner = draw(st.sampled_from([b"\x00"] * 5 + [b"\x01a\x00"]))
        opt = owner + struct.pack("!HHIH", 41, draw(st.sampled_from(PAYLOADS)), ttl, len(options)) + options
    counts = (1, 0, 0, 1 if opt else 0)
    if draw(st.integers(0, 9)) == 0:  # odd counts: the full path's general decoder
        counts = tuple(draw(st.integers(0, 2)) for _ in range(4))  # type: ignore[assignment]
    return struct.pack("!HHHHHH", msg_id, flags, *counts) + question + opt


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A well-formed query with bytes changed, cut or added."""
    data = bytearray(draw(queries()))
    for _ in range(draw(st.integers(1, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data) + draw(st.binary(max_size=6))


any_query = st.one_of(queries(), queries(), mutated(), st.binary(max_size=80))


def again(data: bytes, msg_id: int) -> bytes:
    """The same query under another ID: what a client asking again sends."""
    return struct.pack("!H", msg_id) + data[2:]


@st.composite
def probes(draw: st.DrawFn, asked: list[bytes]) -> bytes:
    """A query asked before (its reply may be cached or kept), or any bytes at all."""
    if asked and draw(st.booleans()):
        return again(draw(st.sampled_from(asked)), draw(st.integers(0, 0xFFFF)))
    return draw(any_query)


AGES = [0, 0, 0.4, 1, 59.5, 61, 119, 300, 301, 4000]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("hot"), RULES)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _fresh(config_path: Path, clock: FakeClock) -> Pipeline:
    """A new pipeline (empty cache) whose cache reads ``clock``."""
    pipeline = load_config(config_path).pipeline()
    for stage in pipeline.stages:
        if isinstance(stage, CacheStage):
            stage.clock = clock
            stage.epoch = clock() - 1.0
    return pipeline


@contextlib.contextmanager
def _frozen(clock: FakeClock) -> Iterator[None]:
    """The hot path's and the listener's clocks, frozen at ``clock``."""
    with (
        mock.patch("horizon_dns.core.handler.clock_now", clock),
        mock.patch("horizon_dns.net.udp.clock_now", clock),
    ):
        yield


async def _full(handler: QueryHandler, data: bytes, transport: str) -> bytes | None:
    return await handler.handle(data, ("127.0.0.1", 5353), transport)


@PROPERTY
@given(
    filled=st.lists(st.tuples(queries(), st.booleans()), max_size=8),
    age=st.sampled_from(AGES),
    tcp=st.booleans(),
    data=st.data(),
)
def test_hot_path_returns_nothing_or_exactly_the_full_paths_bytes(
    config_path: Path,
    loop: asyncio.AbstractEventLoop,
    filled: list[tuple[bytes, bool]],
    age: float,
    tcp: bool,
    data: st.DataObject,
) -> None:
    clock = FakeClock(real_now())
    pipeline = _fresh(config_path, clock)
    handler = QueryHandler(pipeline, nsid="node-a")
    probe = data.draw(probes([query for query, _tcp in filled]))
    with _frozen(clock):
        for query, over_tcp in filled:  # the cache state: what was asked before, and how
            loop.run_until_complete(_full(handler, query, "tcp" if over_tcp else "udp"))
            handler.hot_answer(query, over_tcp)  # the hot path keeps replies too
        clock.now += age
        transport = "tcp" if tcp else "udp"
        hot = handler.hot_answer(probe, tcp)
        full = loop.run_until_complete(_full(handler, probe, transport))
        assert hot is None or hot == full
        # Once the full path has stored the answer, the hot path serves it (or declines).
        again = handler.hot_answer(probe, tcp)
        assert again is None or again == loop.run_until_complete(_full(handler, probe, transport))


@pytest.mark.parametrize(
    "name,qtype,edns,tcp",
    [
        ("a.t.test", "A", None, False),
        ("A.T.TEST", "A", (1232, False), False),
        ("www.nodeb.t.test", "A", (4096, True), False),
        ("www.nodeb.t.test", "AAAA", None, True),
        ("nothere.t.test", "MX", (1232, False), False),  # negative, from the SOA
        ("big.t.test", "TXT", None, False),  # truncated over UDP
        ("big.t.test", "TXT", (1232, False), False),
        ("big.t.test", "TXT", None, True),
    ],
)
def test_the_hot_path_does_answer_what_it_is_made_for(
    config_path: Path,
    loop: asyncio.AbstractEventLoop,
    name: str,
    qtype: str,
    edns: tuple[int, bool] | None,
    tcp: bool,
) -> None:
    import dns.message

    query = dns.message.make_query(name, qtype, use_edns=edns is not None, payload=edns[0] if edns else 1232)
    if edns and edns[1]:
        query.want_dnssec(True)
    data = query.to_wire()
    assert scan_common(data) is not None
    clock = FakeClock(real_now())
    handler = QueryHandler(_fresh(config_path, clock))
    with _frozen(clock):
        transport = "tcp" if tcp else "udp"
        loop.run_until_complete(_full(handler, data, transport))  # now in the cache
        clock.now += 7
        hot = handler.hot_answer(data, tcp)
        aged = loop.run_until_complete(_full(handler, data, transport))
        assert hot is not None and hot == aged  # served, its TTLs aged as the full path ages them
        assert handler.hot_answer(data, tcp) == aged  # and again, from the replies it keeps


# -- the listeners: allow list, rate limit, then the hot path ------------------------------

CLIENTS = ["127.0.0.1", "127.0.0.3", "127.0.0.9", "::1", "10.1.2.3", "10.9.9.9", "192.0.2.7", "2001:db8::1"]
ALLOW = ["127.0.0.0/30", "::1/128", "10.0.0.0/8"]


def _sockaddr(ip: str, port: int) -> bytes:
    if ":" in ip:
        return (
            struct.pack("=H", socket.AF_INET6)
            + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, ip)
            + struct.pack("=I", 0)
        )
    address = socket.inet_pton(socket.AF_INET, ip)
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + address + bytes(8)


class _Batch:
    """What BatchedUdpListener reads from and queues into, without a socket."""

    slots = 64

    def __init__(self) -> None:
        self.incoming: list[tuple[bytes, bytes]] = []
        self.sent: list[bytes] = []
        self.dropped = 0

    def receive(self) -> int:
        return len(self.incoming)

    def message(self, i: int) -> tuple[bytes, bytes]:
        return self.incoming[i]

    def queue(self, _i: int, data: bytes) -> None:
        self.sent.append(data)

    def flush(self) -> None:
        self.incoming = []


class _Transport:
    """A DatagramTransport that keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, _addr: Any) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return False


def _policy(clock: FakeClock, refuse: str) -> EdgePolicy:
    policy = EdgePolicy(rate_qps=2, rate_burst=3, refuse_udp=refuse)
    policy.limiter.clock = clock
    return policy


@PROPERTY
@given(
    filled=st.lists(queries(), max_size=6),
    refuse=st.sampled_from(["refused", "silence"]),
    data=st.data(),
)
def test_the_listeners_shortcuts_give_the_full_paths_bytes_to_every_client(
    config_path: Path, loop: asyncio.AbstractEventLoop, filled: list[bytes], refuse: str, data: st.DataObject
) -> None:
    datagrams = data.draw(
        st.lists(
            st.tuples(probes(filled), st.sampled_from(CLIENTS), st.sampled_from([0, 0, 0, 0.3, 1.5])),
            min_size=1,
            max_size=12,
        )
    )
    clock = FakeClock(real_now())
    pipeline = _fresh(config_path, clock)
    # The reference sees every datagram on the full path; the candidate is the
    # batched listener with the hot path and its shortcut. They share the cache.
    reference = QueryHandler(pipeline)
    reference.hot_enabled = False
    candidate = QueryHandler(pipeline)
    full = UdpListener(reference, InFlight(), Acl(ALLOW), _policy(clock, refuse))
    full_transport = _Transport()
    full.transport = full_transport  # type: ignore[assignment]
    hot = BatchedUdpListener(candidate, InFlight(), Acl(ALLOW), _policy(clock, refuse))
    batch = _Batch()
    hot_transport = BatchTransport(_Transport(), batch)  # type: ignore[arg-type]
    hot.transport = hot_transport  # type: ignore[assignment]
    senders: dict[bytes, Any] = {}

    async def run() -> None:
        for query in filled:
            await _full(candidate, query, "udp")
            candidate.hot_answer(query)
        for datagram, client, wait in datagrams:
            clock.now += wait
            for _ in range(2):  # the second time, the reply the hot path kept may serve it
                batch.incoming = [(datagram, _sockaddr(client, 5353))]
                batch.sent = []
                hot._readable(hot_transport, senders)
                full_transport.sent = []
                reply = full.immediate_reply(datagram, (client, 5353))
                expected = ([reply] if reply is not None else []) + full_transport.sent
                assert batch.sent == expected, (client, datagram)

    with _frozen(clock):
        loop.run_until_complete(run())
