"""Graceful shutdown of a real server process: SIGTERM/SIGINT, idle connections, queries in flight.

A query is kept in flight by a forward stage whose upstream is a UDP socket of this
test on 127.0.0.1: the test decides when (or whether) the upstream answers.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rrset
import pytest
from conftest import SEED_RULES, ServerProcess, start_server
from helpers import tcp_read

TIMEOUT = 3.0
PROMPT_EXIT = 3.0  # seconds a server with nothing in flight may take to exit
SLOW_NAME = "q.slow.test."


@contextmanager
def running(tmp: Path, rules: str, server_yaml: str = "") -> Iterator[ServerProcess]:
    server = start_server(tmp, rules, server_yaml)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(5)


@contextmanager
def fake_upstream() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def forward_rules(upstream: socket.socket) -> str:
    port = upstream.getsockname()[1]
    return f"""
zones:
  slow.test:
    stages:
      - forward:
          upstreams: ["127.0.0.1:{port}"]
          timeout: 10
          total_timeout: 10
"""


def receive_forwarded(upstream: socket.socket, name: str) -> tuple[dns.message.Message, tuple[str, int]]:
    """The forwarded query for ``name``, skipping the stage's loop probes (bounded)."""
    deadline = time.monotonic() + 5
    wanted = dns.name.from_text(name)
    for _ in range(20):
        upstream.settimeout(max(deadline - time.monotonic(), 0.01))
        data, peer = upstream.recvfrom(65535)
        message = dns.message.from_wire(data)
        if message.question and message.question[0].name == wanted:
            return message, peer
    pytest.fail(f"the forward stage never sent {name}")


def answer(upstream: socket.socket, query: dns.message.Message, peer: tuple[str, int]) -> None:
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.7"))
    upstream.sendto(reply.to_wire(), peer)


def wait_for_log(server: ServerProcess, text: str, limit: float = 5.0) -> None:
    """Poll the log file (there is no event to await) for at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while text not in server.log_text():
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not in the log after {limit} s:\n{server.log_text()}")
        time.sleep(0.02)


def stop_and_time(server: ServerProcess, sig: int = signal.SIGTERM, limit: float = PROMPT_EXIT) -> float:
    start = time.monotonic()
    code = server.stop(sig, timeout=limit)
    elapsed = time.monotonic() - start
    assert code == 0, server.log_text()
    return elapsed


def assert_clean_log(server: ServerProcess) -> str:
    log = server.log_text()
    assert "stopping" in log, log
    assert "Traceback" not in log, log
    return log


def framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ConnectionAbortedError):
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_zero_promptly(tmp_path: Path, sig: int) -> None:
    with running(tmp_path, SEED_RULES) as server:
        query = dns.message.make_query("nodeb.mydomain.tld.", "A")
        assert dns.query.udp(query, server.host, port=server.port, timeout=TIMEOUT).rcode() == 0
        elapsed = stop_and_time(server, sig)
    assert elapsed < PROMPT_EXIT
    assert_clean_log(server)


def test_sigterm_closes_idle_tcp_connections(tmp_path: Path) -> None:
    """Idle clients do not hold shutdown up for the 10 s idle timeout."""
    with (
        running(tmp_path, SEED_RULES) as server,
        socket.create_connection((server.host, server.port), timeout=TIMEOUT) as idle,
    ):
        idle.sendall(framed(dns.message.make_query("nodeb.mydomain.tld.", "A").to_wire()))
        tcp_read(idle)
        elapsed = stop_and_time(server)
        assert closed_by_peer(idle)
    assert elapsed < PROMPT_EXIT
    assert_clean_log(server)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_query_in_flight_at_sigterm_is_answered(tmp_path: Path, transport: str) -> None:
    with fake_upstream() as upstream, running(tmp_path, forward_rules(upstream)) as server:
        query = dns.message.make_query(SLOW_NAME, "A")
        query.id = 0x51F7
        family = socket.AF_INET
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        with socket.socket(family, kind) as client:
            client.settimeout(TIMEOUT)
            if transport == "udp":
                client.sendto(query.to_wire(), (server.host, server.port))
            else:
                client.connect((server.host, server.port))
                client.sendall(framed(query.to_wire()))
            forwarded, peer = receive_forwarded(upstream, SLOW_NAME)
            server.proc.send_signal(signal.SIGTERM)
            wait_for_log(server, "stopping")
            assert server.proc.poll() is None, "exited with a query in flight"
            answer(upstream, forwarded, peer)
            data = client.recv(65535) if transport == "udp" else tcp_read(client)
            if transport == "tcp":
                # The last reply sent, the connection closes.
                assert closed_by_peer(client)
        reply = dns.message.from_wire(data)
        assert reply.id == 0x51F7
        assert reply.rcode() == dns.rcode.NOERROR
        assert [r.to_text() for r in reply.answer[0]] == ["192.0.2.7"]
        assert server.proc.wait(PROMPT_EXIT) == 0
    log = assert_clean_log(server)
    assert "still running at shutdown" not in log


def test_query_never_answered_is_abandoned_after_shutdown_timeout(tmp_path: Path) -> None:
    with (
        fake_upstream() as upstream,
        running(tmp_path, forward_rules(upstream), "shutdown_timeout: 0.5\n") as server,
    ):
        query = dns.message.make_query(SLOW_NAME, "A")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(query.to_wire(), (server.host, server.port))
            receive_forwarded(upstream, SLOW_NAME)
            elapsed = stop_and_time(server)
    assert 0.4 <= elapsed < PROMPT_EXIT, elapsed
    log = assert_clean_log(server)
    assert "1 queries were still running at shutdown" in log
