"""Fuzzing the listeners of a real server process with hypothesis.

Every packet is followed by a valid "sentinel" query on the same socket, so the
test never waits on a timeout: whatever arrives before the sentinel's answer is
the fuzzed packet's reply, and it must carry the fuzzed packet's ID. The server
must answer the sentinel every time and never log a traceback.

``HORIZON_FUZZ_EXAMPLES`` sets the examples per strategy (CI: 1500; the long
mode is ``HORIZON_FUZZ_EXAMPLES=1000000``, out of CI). Counts are printed.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import dns.message
import pytest
from conftest import SEED_RULES, ServerProcess, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("HORIZON_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
SENTINEL_ID = 0xBEEF
COUNTS: dict[str, int] = {"udp": 0, "tcp": 0, "replies": 0}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("fuzz")
    server = start_server(work, SEED_RULES, "limits: {rate_qps: 0}\n", ipv6=False)
    try:
        yield server
    finally:
        udp, tcp, replies = COUNTS["udp"], COUNTS["tcp"], COUNTS["replies"]
        print(f"\nfuzz: {udp} UDP and {tcp} TCP packets, {replies} replies checked")
        assert server.stop() == 0
        assert "Traceback" not in server.log_text()


def sentinel() -> bytes:
    query = dns.message.make_query("nodeb.mydomain.tld", "A")
    query.id = SENTINEL_ID
    return query.to_wire()


labels = st.one_of(
    st.binary(min_size=0, max_size=70).map(lambda b: bytes([min(len(b), 255)]) + b),
    st.integers(0xC000, 0xFFFF).map(lambda p: struct.pack("!H", p)),  # compression pointers, loops
    st.just(b"\x00"),
)
structured = st.builds(
    lambda msg_id, flags, counts, name, tail, opt: (
        struct.pack("!HH", msg_id, flags) + struct.pack("!HHHH", *counts) + b"".join(name) + tail + opt
    ),
    st.integers(0, 0xFFFF).filter(lambda i: i != SENTINEL_ID),
    st.integers(0, 0xFFFF),
    st.tuples(*(st.sampled_from([0, 1, 2, 255, 65535]) for _ in range(4))),
    st.lists(labels, max_size=6),
    st.binary(max_size=12),
    st.one_of(
        st.just(b""),
        st.builds(
            lambda size, ext, version, flags, data: (
                b"\x00\x00\x29" + struct.pack("!HBBHH", size, ext, version, flags, len(data)) + data
            ),
            st.integers(0, 65535),
            st.integers(0, 255),
            st.integers(0, 3),
            st.integers(0, 0xFFFF),
            st.binary(max_size=20),
        ),
    ),
)


def _check_udp(server: ServerProcess, packet: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect((server.host, server.port))
        sock.send(packet)
        sock.send(sentinel())
        COUNTS["udp"] += 1
        while True:
            reply = sock.recv(65535)
            reply_id = struct.unpack_from("!H", reply)[0]
            if reply_id == SENTINEL_ID and reply[2] & 0x80 and reply.find(b"\x05nodeb") > 0:
                break
            COUNTS["replies"] += 1
            assert len(packet) >= 12 and reply_id == struct.unpack_from("!H", packet)[0], (packet, reply)
            assert not packet[2] & 0x80, "a response (QR=1) must never be answered"


@FUZZ
@given(packet=st.binary(max_size=600))
def test_udp_arbitrary_bytes(fuzzed: ServerProcess, packet: bytes) -> None:
    _check_udp(fuzzed, packet)


@FUZZ
@given(packet=structured)
def test_udp_structured_but_wrong(fuzzed: ServerProcess, packet: bytes) -> None:
    _check_udp(fuzzed, packet)


@FUZZ
@given(payloads=st.lists(st.one_of(st.binary(max_size=300), structured), min_size=1, max_size=4))
def test_tcp_arbitrary_messages(fuzzed: ServerProcess, payloads: list[bytes]) -> None:
    with socket.create_connection((fuzzed.host, fuzzed.port), timeout=5) as sock:
        framed = b"".join(struct.pack("!H", len(p)) + p for p in payloads) + struct.pack(
            "!H", len(sentinel())
        )
        sock.sendall(framed + sentinel())
        COUNTS["tcp"] += len(payloads)
        expected = {struct.unpack_from("!H", p)[0] for p in payloads if len(p) >= 2}
        buffer = b""
        while True:
            while len(buffer) < 2:
                chunk = sock.recv(65535)
                assert chunk, "the server closed the connection before answering the sentinel"
                buffer += chunk
            (length,) = struct.unpack_from("!H", buffer)
            while len(buffer) < 2 + length:
                chunk = sock.recv(65535)
                assert chunk
                buffer += chunk
            reply, buffer = buffer[2 : 2 + length], buffer[2 + length :]
            reply_id = struct.unpack_from("!H", reply)[0]
            if reply_id == SENTINEL_ID and reply.find(b"\x05nodeb") > 0:
                break
            COUNTS["replies"] += 1
            assert reply_id in expected


def test_truncated_framing_then_a_new_connection_is_answered(fuzzed: ServerProcess, tmp_path: Path) -> None:
    with socket.create_connection((fuzzed.host, fuzzed.port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", 500) + b"\x12\x34only part of it")
    with socket.create_connection((fuzzed.host, fuzzed.port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(sentinel())) + sentinel())
        reply = sock.recv(65535)
        assert struct.unpack_from("!H", reply, 2)[0] == SENTINEL_ID
