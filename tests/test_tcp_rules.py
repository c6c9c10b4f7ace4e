"""TCP that cannot be starved or inflated: the connection rules, attacked from outside.

Each test plays one attack against a real listener on loopback (in-process for the
connection table's bookkeeping, a server process where memory is measured) and
asserts what an honest client sees meanwhile: its answer, within the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import pytest
from conftest import SEED_RULES, ServerProcess, start_server
from helpers import config_from, recv_exactly

from horizon_dns.config.schema import ListenAddress
from horizon_dns.core.access import EdgePolicy
from horizon_dns.core.handler import QueryHandler
from horizon_dns.net import tcp
from horizon_dns.net.server import DnsServer
from horizon_dns.net.tcp import TcpLimits

QUERY = dns.message.make_query("nodeb.mydomain.tld", "A").to_wire()
FRAME = struct.pack("!H", len(QUERY)) + QUERY


def _server(
    tmp_path: Path, limits: TcpLimits, allow: tuple[str, ...] = ("127.0.0.0/8",), **policy: int
) -> DnsServer:
    handler = QueryHandler(config_from(tmp_path, SEED_RULES).pipeline())
    listen = [ListenAddress("127.0.0.1", 0, allow)]
    return DnsServer(handler, listen, limits, EdgePolicy(**policy), batched=False)  # type: ignore[arg-type]


async def _ask(port: int, source: str = "127.0.0.1", timeout: float = 2.0) -> dns.message.Message:
    """One query over a fresh connection from ``source``; the answer within ``timeout``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(FRAME)
        (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), timeout))
        return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), timeout))
    finally:
        writer.close()


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes the connection within ``timeout``."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_off_list_connections_are_closed_unread_and_never_count(tmp_path: Path) -> None:
    # 8 addresses outside the allow list x 32 connections each, against an allowed client.
    server = _server(tmp_path, TcpLimits(max_connections=64), allow=("127.0.0.1/32",))

    async def scenario() -> tuple[list[bool], float, int]:
        await server.start()
        port = server.bound[0].port
        try:
            streams = [
                await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{2 + i % 8}", 0))
                for i in range(256)
            ]
            for _reader, writer in streams:
                writer.write(b"\xff\xff\x00")
            closed = await asyncio.gather(*(_closed(reader, 2.0) for reader, _writer in streams))
            started = time.monotonic()
            answer = await _ask(port)
            assert answer.answer
            for _reader, writer in streams:
                writer.close()
            return list(closed), time.monotonic() - started, len(server.connections.open)
        finally:
            await server.stop(1)

    closed, took, counted = asyncio.run(scenario())
    assert all(closed) and took < 2.0
    assert counted <= 1  # only the allowed client was ever counted
    assert server.policy.refused == 256


def test_a_fresh_client_is_answered_while_300_connections_trickle(tmp_path: Path) -> None:
    # Every connection announces a 64 KiB message and sends a byte of it: a slowloris
    # that the idle timer alone never ends. The table is full; the newcomer evicts.
    server = _server(tmp_path, TcpLimits(max_connections=256))

    async def scenario() -> float:
        await server.start()
        port = server.bound[0].port
        try:
            streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
            for _reader, writer in streams:
                writer.write(b"\xff\xff\x00")
                await writer.drain()
            started = time.monotonic()
            answer = await _ask(port)
            assert answer.answer
            for _reader, writer in streams:
                writer.close()
            return time.monotonic() - started
        finally:
            await server.stop(1)

    took = asyncio.run(scenario())
    assert took < 2.0
    assert server.connections.evicted >= 300 + 1 - 256
    assert server.connections.rejected == 0


def test_a_trickled_message_is_cut_off_at_its_deadline(tmp_path: Path) -> None:
    # A byte every 50 ms keeps the connection from ever being idle; the message
    # deadline, counted from its first byte, still ends it.
    server = _server(tmp_path, TcpLimits(idle_timeout=10.0, message_timeout=0.5))

    async def scenario() -> float:
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.bound[0].port)
            started = time.monotonic()
            writer.write(FRAME[:2])
            for byte in FRAME[2:]:
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)  # the attacker's pace, not a wait for the server
                if len(server.connections.open) == 0:
                    break
            assert await _closed(reader, 2.0)
            writer.close()
            return time.monotonic() - started
        finally:
            await server.stop(1)

    took = asyncio.run(scenario())
    assert 0.4 < took < 1.5


def test_a_frame_trickled_two_bytes_at_a_time_is_answered(tmp_path: Path) -> None:
    # Incremental framing: the bytes of an unfinished message are appended, and the
    # message parsed once it is complete.
    server = _server(tmp_path, TcpLimits())
    query = dns.message.make_query("nodeb.mydomain.tld", "A", use_edns=True, pad=1024).to_wire()
    frame = struct.pack("!H", len(query)) + query

    async def scenario() -> dns.message.Message:
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.bound[0].port)
            for i in range(0, len(frame), 2):
                writer.write(frame[i : i + 2])
                await writer.drain()
            (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 2))
            answer = dns.message.from_wire(await reader.readexactly(length))
            writer.close()
            return answer
        finally:
            await server.stop(1)

    assert asyncio.run(scenario()).answer


def test_a_client_at_its_cap_off_loopback_loses_its_idle_connection_not_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests may only use loopback, so the listener is told no address is loopback.
    monkeypatch.setattr(tcp, "is_loopback", lambda ip: False)
    server = _server(tmp_path, TcpLimits(), tcp_per_client=2)

    async def scenario() -> tuple[bool, bool, dns.message.Message]:
        await server.start()
        port = server.bound[0].port
        try:
            first = await asyncio.open_connection("127.0.0.1", port)
            second = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0)  # both admitted before the third arrives
            answer = await _ask(port)  # the third: the idle first makes room
            first_closed = await _closed(first[0], 1.0)
            second_closed = await _closed(second[0], 0.2)
            for _reader, writer in (first, second):
                writer.close()
            return first_closed, second_closed, answer
        finally:
            await server.stop(1)

    first_closed, second_closed, answer = asyncio.run(scenario())
    assert first_closed and not second_closed and answer.answer
    assert server.connections.evicted == 1


# Memory, measured on a server process --------------------------------------------------


# The seed's rules behind a cache, as a node serves them: repeated questions take the hot path.
CACHED_RULES = SEED_RULES.replace("    stages:\n", "    stages:\n      - cache: {}\n")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(tmp_path, CACHED_RULES, ipv6=False)
    try:
        yield server
    finally:
        server.stop()
        assert "Traceback" not in server.log_text()


def _rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_pipelines_and_never_reads_costs_a_bounded_buffer(served: ServerProcess) -> None:
    warm = socket.create_connection((served.host, served.port), timeout=2)
    warm.sendall(FRAME * 1000)  # the answer is cached, the listener warm
    received = 0
    while received < 1000 * 20:
        received += len(warm.recv(65536))
    warm.close()
    before = _rss(served.proc.pid)
    sock = socket.create_connection((served.host, served.port), timeout=2)
    sock.setblocking(False)
    burst = FRAME * 4096  # ~190 KiB of queries
    sent, deadline, stalled_since = 0, time.monotonic() + 30, None
    while sent < 32 * 2**20 and time.monotonic() < deadline:
        try:
            sent += sock.send(burst)
            stalled_since = None
        except BlockingIOError:
            # The server stopped reading: every buffer on the way is full.
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                break
            time.sleep(0.01)
    grown = _rss(served.proc.pid) - before
    sock.close()
    assert sent < 32 * 2**20, "the server kept reading a client that never reads"
    mib = 2**20
    print(f"\nno-read client: {sent / mib:.1f} MiB sent before reading stopped; RSS +{grown / mib:.1f} MiB")
    assert grown <= 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_an_attack_soak_keeps_memory_and_descriptors_bounded_and_answers_the_honest(
    served: ServerProcess,
) -> None:
    """200 clients that pipeline and never read, 40 slowloris trickles and 8 connections
    of pipelined garbage at once: the server's RSS and descriptors stay bounded, an
    honest client is answered, and everything is given back afterwards."""
    pid, host, port = served.proc.pid, served.host, served.port

    async def attack() -> tuple[int, int, float, int]:
        rss_before, fds_before = _rss(pid), _fds(pid)
        stop = asyncio.Event()
        writers: list[asyncio.StreamWriter] = []

        async def no_reader() -> None:
            _reader, writer = await asyncio.open_connection(host, port)
            writers.append(writer)
            writer.write(FRAME * 20000)  # ~1 MiB of queries, never a reply read

        async def trickler() -> None:
            _reader, writer = await asyncio.open_connection(host, port)
            writers.append(writer)
            writer.write(b"\xff\xff")
            while not stop.is_set() and not writer.is_closing():
                writer.write(b"\x00")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)  # the attacker's pace

        async def garbage(seed: int) -> None:
            reader, writer = await asyncio.open_connection(host, port)
            writers.append(writer)
            junk = random.Random(seed)
            while not stop.is_set() and not writer.is_closing():
                body = junk.randbytes(junk.randrange(0, 300))
                writer.write(struct.pack("!H", len(body)) + body)
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(reader.read(65536), 0.05)

        attackers = [asyncio.ensure_future(no_reader()) for _ in range(200)]
        attackers += [asyncio.ensure_future(trickler()) for _ in range(40)]
        attackers += [asyncio.ensure_future(garbage(i)) for i in range(8)]
        await asyncio.gather(*attackers[:200], return_exceptions=True)
        peak_rss, peak_fds = 0, 0
        for _ in range(10):  # 2 s under attack, sampled
            peak_rss, peak_fds = max(peak_rss, _rss(pid)), max(peak_fds, _fds(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        started = time.monotonic()
        answer = await _ask(port)
        took = time.monotonic() - started
        assert answer.answer
        peak_rss, peak_fds = max(peak_rss, _rss(pid)), max(peak_fds, _fds(pid))
        stop.set()
        for writer in writers:
            writer.close()
        await asyncio.gather(*attackers, return_exceptions=True)
        for _ in range(100):  # the server sees the closes asynchronously: a bounded wait
            if _fds(pid) <= fds_before + 2:
                break
            await asyncio.sleep(0.05)
        return peak_rss - rss_before, peak_fds, took, _fds(pid) - fds_before

    grown, peak_fds, took, left = asyncio.run(attack())
    print(
        f"\nsoak: RSS +{grown / 2**20:.1f} MiB, {peak_fds} descriptors at most, honest answer in {took:.2f} s"
    )
    assert took < 2.0
    assert grown <= 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"
    assert peak_fds <= 256 + 32, peak_fds  # the table's 256, listeners and the rest
    assert left <= 2, f"{left} descriptors not given back"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_large_frame_trickled_in_two_byte_writes_costs_linear_work(served: ServerProcess) -> None:
    # Reported: 0.61 s of CPU per 64 KiB frame, the buffer copied on every read. The
    # frame is a query padded to ~60 KiB (EDNS padding, RFC 7830), sent 2 bytes a segment.
    plain = dns.message.make_query("nodeb.mydomain.tld", "A").to_wire()
    padding = struct.pack("!HH", 12, 60000) + bytes(60000)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(padding)) + padding
    query = plain[:10] + b"\x00\x01" + plain[12:] + opt  # ARCOUNT 1: the OPT
    frame = struct.pack("!H", len(query)) + query
    sock = socket.create_connection((served.host, served.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one segment per write
    before = _cpu_seconds(served.proc.pid)
    for i in range(0, len(frame), 2):
        sock.sendall(frame[i : i + 2])
    (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    answer = dns.message.from_wire(recv_exactly(sock, length))
    spent = _cpu_seconds(served.proc.pid) - before
    sock.close()
    print(f"\n{len(frame)} bytes in 2-byte writes: {spent:.2f} s of server CPU")
    assert answer.answer
    assert spent < 0.3, f"{spent:.2f} s of CPU for one trickled frame"
